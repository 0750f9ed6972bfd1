"""The model: timm networks (`networks`) and the weights packaged with the project (`pretrained`),
the LightningModule around them (`classifier`), the metrics it logs with the one 0.5 threshold that
every later stage shares (`metrics`), and the training callbacks: transfer learning (`finetune`)
and a weight EMA whose decay warms up (`ema`)."""

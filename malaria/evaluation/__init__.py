"""Evaluation: errors per slide (`slide_errors`) and a run's figures and report.md (`run_report`),
scored with the model's own metrics (`malaria.model.metrics`)."""

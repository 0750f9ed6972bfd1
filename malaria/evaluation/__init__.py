"""Evaluation: errors per slide (`slide_errors`), the slides drawn in stain space (`slide_map`) and
a run's figures and report.md (`run_report`), scored with the model's own metrics
(`malaria.model.metrics`)."""

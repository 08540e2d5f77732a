"""The evaluation phase: calibration on validation, inference, metrics and plots, Grad-CAM
(stages calibrate, evaluate, explain)."""

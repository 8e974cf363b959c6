"""How a probed job is set up: the model, its fine-tuning method, its strategy wrapper, its optimizer."""

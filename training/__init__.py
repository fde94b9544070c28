"""Training: data sets, models, methods (CLIP now; SSL methods to come), trainer, evaluation, export."""

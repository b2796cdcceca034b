"""soup: model soups for fine-tuned models."""

"""Text processing for caption datasets: tokenizers (``tokenizer``)."""

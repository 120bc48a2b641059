"""One module per model family, each a Denoiser subclass; loading.py's registry names them."""

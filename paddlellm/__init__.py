"""paddlellm: a PaddlePaddle toolkit for the life of a large language model."""
__version__ = "0.1.0"

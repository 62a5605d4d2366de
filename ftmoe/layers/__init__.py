"""Model building blocks whose parameter names are FasterTransformer's file names."""

"""export stage of elastic_compile."""

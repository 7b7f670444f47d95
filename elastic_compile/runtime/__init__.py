"""runtime stage of elastic_compile."""

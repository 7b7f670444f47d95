"""train stage of elastic_compile."""

"""analysis stage of elastic_compile."""

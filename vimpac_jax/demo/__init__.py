"""`vimpac demo` and `vimpac demo-data`: the built-in default chain (`chain`) on a generated dataset (`data`)."""

"""Built-in plugins, registered through the entry-point group "eflow" like any third-party plugin."""

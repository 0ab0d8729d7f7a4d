"""The application runtime of the sandbox: app pods run as local processes (see runtime.py)."""

"""The local sandbox that tests and `make demo` run against; see sandbox.stack."""

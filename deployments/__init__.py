"""Entry points that put the build-and-deploy flow in front of people: served deployments and block setup."""

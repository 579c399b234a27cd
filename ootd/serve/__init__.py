"""The ootd Ray Serve app: `app` holds the deployments and builders, `api` the HTTP routes and models."""

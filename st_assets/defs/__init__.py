"""The Dagster layer: thin assets, checks and sensors that call the plain steps."""

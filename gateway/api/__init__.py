"""HTTP layer: translates between Litestar requests and the pipeline; no logic of its own."""

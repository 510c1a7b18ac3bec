"""The request pipeline: one file per layer, nested outermost first in :func:`app.services.build_pipeline`."""

"""leukops serving: the champion model behind a FastAPI app (``serving.app.create_app``)."""

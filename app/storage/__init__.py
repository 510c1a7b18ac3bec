"""Storage: SQLAlchemy 2.0 async models, the engine, and Alembic migrations."""

"""faceparse: distributed face parsing with SegFormer, Celery, Redis and S3."""

__version__ = "0.1.0"

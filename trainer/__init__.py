"""Stage two: stream a teacher cache and distill students with sparse KL losses."""

__all__: list[str] = []

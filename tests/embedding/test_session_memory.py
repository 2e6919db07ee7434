"""The server's memory settings: ONNX Runtime's CPU arena is off in the session the server embeds with."""

from backend.embedding.embedder import Embedder


def test_the_embedding_session_keeps_no_cpu_arena(embedder: Embedder) -> None:
    """With its arena, ONNX Runtime kept the largest batch's activations for the life of the server (+340 MB
    after one batch of 32 Lite0 inputs, +100 MB without: measured in docs/scale.md)."""
    session = embedder._session.session  # type: ignore[union-attr]
    assert session.get_session_options().enable_cpu_mem_arena is False

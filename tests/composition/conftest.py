from tests.results.conftest import broker, queue_name, result_backend, worker

__all__ = ["broker", "queue_name", "result_backend", "worker"]

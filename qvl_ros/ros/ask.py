"""Service ``~/ask`` of qvl_node: a question about the newest synchronized set, answered by the
batch worker between two batches.

The request names a prompt, optionally a subset of the cameras (by name) and the longest answer.
The handler is a coroutine: it takes the newest set the synchronizer made, hands one
model call (:func:`qvl_ros.core.model_call.call_model`, the node's own: a clip set's frame rates
included) to the worker (:meth:`qvl_ros.core.batcher.Batcher.submit`, a bounded queue of
``ask.queue_depth``) and awaits its result, so the executor keeps serving camera frames and the
feature stream meanwhile. The worker triggers a guard condition when the answer is ready, which
wakes the executor to send the response. Errors come back as ``success: false`` with a message:
no set yet, unknown camera, node inactive, queue full, model failure.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.task import Future

from ..core.model_call import ModelRequest, call_model
from .feature_msgs import ros_string, time_msg

__all__ = ["AskServer"]


class AskServer:
    """Glue between the ``~/ask`` service and the node's pipeline.

    Args:
        node: the qvl_node (creates the service and the wake-up guard condition).
        latest: returns the newest set and the frames' headers, ``(SyncSet, headers)`` or None.
        submit: ``Batcher.submit``.
        camera_names: the node's camera names, in set order.
        default_tokens: returns the default answer length (``caption.max_new_tokens``).
        why_no_set: returns a short explanation when ``latest()`` is None.
    """

    def __init__(self, node, *, latest: Callable[[], Optional[tuple]], submit: Callable[..., bool],
                 camera_names: Sequence[str], default_tokens: Callable[[], int],
                 why_no_set: Callable[[], str], queue_depth: int) -> None:
        from qvl_ros.srv import Ask

        self._node = node
        self._latest = latest
        self._submit = submit
        self._names = list(camera_names)
        self._default_tokens = default_tokens
        self._why_no_set = why_no_set
        self._queue_depth = int(queue_depth)
        self.answered = 0
        self.refused = 0
        self._wake = node.create_guard_condition(lambda: None)
        self.service = node.create_service(Ask, "~/ask", self._on_ask, callback_group=ReentrantCallbackGroup())

    def destroy(self) -> None:
        self._node.destroy_service(self.service)
        self._node.destroy_guard_condition(self._wake)

    def _fail(self, response, message: str):
        self.refused += 1
        response.success, response.message = False, message
        return response

    def _select(self, wanted: Sequence[str]) -> List[int]:
        if not wanted:
            return list(range(len(self._names)))
        unknown = [n for n in wanted if n not in self._names]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; this node has {self._names}")
        return [self._names.index(n) for n in wanted]

    async def _on_ask(self, request, response):
        if not request.prompt.strip():
            return self._fail(response, "prompt is empty")
        try:
            chosen = self._select(list(request.camera_names))
        except ValueError as exc:
            return self._fail(response, str(exc))
        newest = self._latest()
        if newest is None:
            return self._fail(response, f"no synchronized set available: {self._why_no_set()}")
        sync_set, headers = newest
        tokens = int(request.max_new_tokens) or int(self._default_tokens())
        question = ModelRequest(request.prompt, features=False, texts=True, max_new_tokens=tokens)
        done: Future = Future()

        def answer(model) -> None:  # on the worker thread
            try:
                done.set_result(call_model(model, [sync_set], question, cameras=chosen)[1][0])
            except Exception as exc:  # reported to the caller, the worker goes on
                done.set_result(exc)
            self._wake.trigger()

        def cancel(reason: str) -> None:
            done.set_result(RuntimeError(reason))
            self._wake.trigger()

        if not self._submit(answer, cancel):
            return self._fail(response, f"busy: {self._queue_depth} questions already wait (ask.queue_depth)")
        result = await done
        if isinstance(result, BaseException):
            return self._fail(response, f"model failed: {type(result).__name__}: {result}")
        self.answered += 1
        response.success, response.text = True, ros_string(result)
        response.camera_names = [self._names[k] for k in chosen]
        response.camera_headers = [headers[k] for k in chosen]
        response.stamp = time_msg(sync_set.stamp)
        return response

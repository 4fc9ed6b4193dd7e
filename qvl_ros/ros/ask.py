"""Service ``~/ask`` of qvl_node: a question about the newest synchronized set, answered by the
batch worker, interleaved with the batches.

The request names a prompt, optionally a subset of the cameras (by name) and the longest answer.
It is checked against the node's limits first (:mod:`qvl_ros.core.ask_request`: prompt length
``ask.max_prompt_chars``, answer length ``ask.max_new_tokens``, each camera known and named
once) and refused with the reason beyond them. The handler is a coroutine: it takes the newest
set the synchronizer made, hands one model call (:func:`qvl_ros.core.model_call.call_model`, the
node's own: a clip set's frame rates included) to the worker
(:meth:`qvl_ros.core.batcher.Batcher.submit`, a bounded queue of ``ask.queue_depth``) and awaits
its result, so the executor keeps serving camera frames meanwhile. The answer decodes with a
:class:`~qvl_ros.model.decode_control.DecodeControl` of the node's stop switch (private decode
state; every chunk of decode steps the worker runs the batches that are due, so the feature
stream waits at most one chunk), and deactivate, cleanup and shutdown stop it between two decode
steps. The worker triggers a guard condition when the answer is ready, which wakes the executor
to send the response.

Every request gets a response (the request queue's depth is ``ask.request_depth``, at least the
question queue's): ``success: false`` with a message when refused (limits, no set yet, node
inactive, "busy": the question queue is full), stopped (the text generated so far is returned
with it) or failed.

The service and its guard condition live as long as the node (created with it, destroyed by
``destroy_node`` after the worker was joined), so an answer that completes around a lifecycle
transition is always sent through a valid handle.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.qos import QoSProfile
from rclpy.task import Future

from ..core.ask_request import AskLimits, AskRefused, check_ask
from ..core.model_call import ModelRequest, call_model
from .feature_msgs import ros_string, time_msg

__all__ = ["AskServer", "ANSWER_CHUNK"]

ANSWER_CHUNK = 8  # decode steps between two looks at the waiting batches


class _NotRun(Exception):
    """A queued question cancelled before it ran (deactivate, cleanup, shutdown)."""


class AskServer:
    """Glue between the ``~/ask`` service and the node's pipeline.

    Args:
        node: the qvl_node (creates the service and the wake-up guard condition).
        latest: returns the newest set and the frames' headers, ``(SyncSet, headers)`` or None.
        submit: ``submit(task, cancel)`` -> None when queued, else the reason of the refusal;
            ``task(model, control_options)`` runs on the worker.
        camera_names: the node's camera names, in set order.
        limits: returns the node's current :class:`~qvl_ros.core.ask_request.AskLimits`.
        why_no_set: returns a short explanation when ``latest()`` is None.
        control: ``control(**options)``: a context manager giving a DecodeControl of the node's
            stop switch (:meth:`qvl_ros.core.stop_switch.StopSwitch.control`).
        between_chunks: run on the worker between two chunks of an answer (the due batches).
        request_depth: history depth of the service's request queue.
    """

    def __init__(self, node, *, latest: Callable[[], Optional[tuple]], submit: Callable[..., Optional[str]],
                 camera_names: Sequence[str], limits: Callable[[], AskLimits], why_no_set: Callable[[], str],
                 control: Callable, between_chunks: Callable[[], object], request_depth: int) -> None:
        from qvl_ros.srv import Ask

        self._node = node
        self._latest = latest
        self._submit = submit
        self._names = list(camera_names)
        self._limits = limits
        self._why_no_set = why_no_set
        self._control = control
        self._between_chunks = between_chunks
        self.answered = 0
        self.refused = 0
        self.stopped = 0
        self.running = None  # the DecodeControl of the answer being generated, if any
        self._wake = node.create_guard_condition(lambda: None)
        self.service = node.create_service(Ask, "~/ask", self._on_ask, qos_profile=QoSProfile(depth=int(request_depth)),
                                           callback_group=ReentrantCallbackGroup())

    def destroy(self) -> None:
        """Destroy the service and the guard condition (the worker must be joined already)."""
        self._node.destroy_service(self.service)
        self._node.destroy_guard_condition(self._wake)

    def _fail(self, response, message: str):
        self.refused += 1
        response.success, response.message = False, message
        return response

    def _wake_executor(self) -> None:
        try:
            self._wake.trigger()
        except Exception:  # the context is going down: nobody waits for the response any more
            pass

    async def _on_ask(self, request, response):
        try:
            chosen, tokens = check_ask(request.prompt, list(request.camera_names), int(request.max_new_tokens),
                                       self._names, self._limits())
        except AskRefused as exc:
            return self._fail(response, str(exc))
        newest = self._latest()
        if newest is None:
            return self._fail(response, f"no synchronized set available: {self._why_no_set()}")
        sync_set, headers = newest
        question = ModelRequest(request.prompt, features=False, texts=True, max_new_tokens=tokens)
        done: Future = Future()

        def answer(model) -> None:  # on the worker thread
            try:
                done.set_result(self._answer(model, sync_set, question, chosen))
            except Exception as exc:  # reported to the caller, the worker goes on
                done.set_result(exc)
            self._wake_executor()

        def cancel(reason: str) -> None:
            done.set_result(_NotRun(reason))
            self._wake_executor()

        refusal = self._submit(answer, cancel)
        if refusal is not None:
            return self._fail(response, refusal)
        result = await done
        if isinstance(result, _NotRun):
            return self._fail(response, f"not answered: {result}")
        if isinstance(result, BaseException):
            return self._fail(response, f"model failed: {type(result).__name__}: {result}")
        text, control = result
        response.text = ros_string(text)
        response.camera_names = [self._names[k] for k in chosen]
        response.camera_headers = [headers[k] for k in chosen]
        response.stamp = time_msg(sync_set.stamp)
        if control.stopped:
            self.stopped += 1
            response.success = False
            response.message = f"stopped after {control.steps} tokens: {control.reason}"
            return response
        self.answered += 1
        response.success = True
        return response

    def _answer(self, model, sync_set, question: ModelRequest, chosen) -> tuple:
        """(text, control): one answer decoded chunk by chunk, the due batches run in between."""
        with self._control(private_state=True, chunk=ANSWER_CHUNK, on_chunk=self._between_chunks) as control:
            if control.stopped:  # the node was deactivated while the question waited
                return "", control
            self.running = control
            try:
                return call_model(model, [sync_set], question, cameras=chosen, control=control)[1][0], control
            finally:
                self.running = None

"""Celery settings for notifier, in one place (DESIGN.md §4).

At-least-once delivery on Redis: a task is acknowledged only after it ran (acks_late), a
worker child killed mid-task puts its task back (reject_on_worker_lost), each child reserves
one task at a time (prefetch 1). A reserved-but-unacknowledged message is redelivered after
`visibility_timeout`, which must stay far above the hard time limit; long waits never become
ETA tasks (they live in the scheduler's Redis ZSET), so nothing is reserved for long.
"""

import os

VISIBILITY_TIMEOUT = int(os.environ.get("NOTIFIER_VISIBILITY_TIMEOUT", "300"))
TASK_TIME_LIMIT = int(os.environ.get("NOTIFIER_TASK_TIME_LIMIT", "60"))

task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_time_limit = TASK_TIME_LIMIT
# The soft limit leaves the step time to record what its send did: 10 s, a fifth of a short limit.
task_soft_time_limit = TASK_TIME_LIMIT - min(10, TASK_TIME_LIMIT // 5)
broker_transport_options = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
}
result_backend_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT}
task_ignore_result = True  # state lives in the ledger, not in Celery results

task_serializer = "json"
accept_content = ["json"]
task_default_queue = "notifier.dispatch"
task_create_missing_queues = True

# Publishing must fail fast when Redis is down: the API answers 503 and Alertmanager retries.
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
broker_connection_timeout = 2
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # a worker waits for Redis to come back

worker_hijack_root_logger = False
worker_send_task_events = False
# Celery's default to be (6.0) SIGTERMs every running late-acked task when the broker connection
# drops, so that it runs once more instead of finishing unacknowledged. The broker is the
# ledger's Redis: a failover then cut every send in flight, and a send the provider already took
# was taken over as maybe sent and, on email or push, sent again. Our tasks are idempotent (the
# claim of a finished delivery is DONE): they finish, wait for Redis to record what they did
# (notifier.pipeline.redis_wait), and their redelivered message is a no-op.
worker_cancel_long_running_tasks_on_connection_loss = False

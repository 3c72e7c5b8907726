"""fleetd's warm holder template (fleetd.holder.template, driven through fleetctl.template):
started before fleetd's event loop and threads, followed by its pidfd, and started again
after a pause once it is gone. Meanwhile holders are exec'd as before (fleetd.clusters.launch).

The pause doubles while templates keep dying young, so that one that cannot start or live
costs a process start every few minutes at most, not a tight loop; it starts over from the
first once a template lived STEADY seconds.
"""

from collections.abc import Mapping

import anyio
import structlog
from anyio.abc import TaskStatus

from fleetctl.template import Template

log = structlog.get_logger("fleetd.clusters")

RESTART_FIRST = 5.0
"""Seconds between a template's exit and the next template's start, at first."""
RESTART_MAX = 300.0
STEADY = 60.0


class WarmTemplate:
    """fleetd's one template, when it runs. `env` is the holders' (fleetd.clusters.launch.
    holder_env): the template's own, and each forked holder's."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.template: Template | None = None

    def start(self) -> None:
        """Start a template now (blocking: fleetd's start-up calls this before its event loop
        runs). One that cannot start is said so, and holders are exec'd meanwhile."""
        try:
            self.template = Template.start(self.env)
        except OSError as exc:
            log.warning("holder_template_not_started", error=str(exc))

    def usable(self) -> Template | None:
        """The template, unless it is gone or out of use."""
        template = self.template
        return template if template is not None and template.serves(self.env) else None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the template; start another after a pause whenever it is gone. Cancelled,
        close it (it exits; the holders it forked go on)."""
        pause = RESTART_FIRST
        task_status.started()
        try:
            while True:
                if self.template is not None:
                    log.info("holder_template_started", pid=self.template.pid)
                    pause = await self._until_exit(self.template, pause)
                await anyio.sleep(pause)
                pause = min(pause * 2, RESTART_MAX)
                await anyio.to_thread.run_sync(self.start)
        finally:
            self.close()

    async def _until_exit(self, template: Template, pause: float) -> float:
        """Wait until the template exits; the pause before the next one."""
        born = anyio.current_time()
        await anyio.wait_readable(template.pidfd)
        self.template = None
        template.close()  # reaps it
        log.warning(
            "holder_template_exited", pid=template.pid, exit_code=template.process.returncode
        )
        return RESTART_FIRST if anyio.current_time() - born >= STEADY else pause

    def close(self) -> None:
        if self.template is not None:
            self.template.close()
            self.template = None

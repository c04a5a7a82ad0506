"""Run a launch plan: start in order, register endpoints, supervise, and always clean up.

Order: environment service(s) (``launcher.environment`` and ``launcher.environment_services``,
wait for their health), inference workers (wait for all), register each
worker with the service, trainer. Then, until the trainer exits: a dead environment service is
restarted (:mod:`.restart`), a dead inference worker ends the run (the environment's judge or tool
calls would fail from then on, silently degrading training). Whatever ends the run, an exception,
the trainer's exit, SIGINT or SIGTERM, every process tree started here is stopped in ``finally``.

Trajectory mode (``trainer.atropos.mode: trajectory``): atroposlib's run-api (wait for it), the
trainer pointed at it, then, once the trainer's policy endpoint answers, the Atropos environments.
A dead environment is restarted (bounded, as the environment service); the trainer waits for
batches meanwhile. A dead run-api ends the run: it held the queue and the trainer's registration.
No environment service is started and nothing is registered.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from recipe.atropos.launcher.console import LogEcho
from recipe.atropos.launcher.health import LaunchError, check_ports_free, probe, wait_until_healthy
from recipe.atropos.launcher.plan import LaunchPlan, ServiceSpec, trajectory_ports_to_check
from recipe.atropos.launcher.process import ManagedProcess, terminate_all
from recipe.atropos.launcher.restart import EnvironmentKeeper

__all__ = ["Interrupted", "Launcher", "STATE_FILE"]

logger = logging.getLogger("atropos.launcher")

# Written in the run folder after every start, restart and exit: what runs, with which pid.
STATE_FILE = "services.json"


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: unwind to the cleanup (a BaseException, like Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Launcher:
    """Starts and supervises the services of one :class:`LaunchPlan`. Use :meth:`run` once.

    Install :meth:`handle_signal` as the handler of SIGINT/SIGTERM/SIGHUP: it raises
    :class:`Interrupted` in the main thread, except inside a critical section (starting a process:
    an interruption between fork and recording the pid would leave it unknown, so unkillable),
    where the signal is held until the section ends.
    """

    def __init__(self, plan: LaunchPlan, *, console: bool = False) -> None:
        self.plan = plan
        self.echo = LogEcho() if console else None
        self.processes: dict[str, ManagedProcess] = {}
        self.keeper: EnvironmentKeeper | None = None
        self.env_keepers: dict[str, EnvironmentKeeper] = {}
        self.stopping = False
        self._log_handler: logging.Handler | None = None
        self._in_critical_section = False
        self._pending_signal: int | None = None

    def handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Signal handler: stop the run (see the class docstring)."""
        if self.stopping:
            logger.info("%s received while stopping: still stopping", signal.Signals(signum).name)
        elif self._in_critical_section:
            self._pending_signal = signum
        else:
            raise Interrupted(signum)

    @contextmanager
    def _critical_section(self) -> Iterator[None]:
        self._in_critical_section = True
        try:
            yield
        finally:
            self._in_critical_section = False
            if self._pending_signal is not None and not self.stopping:
                raise Interrupted(self._pending_signal)

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> int:
        """Launch and supervise; returns the trainer's exit code. Raises :class:`LaunchError`."""
        try:
            # Before anything is created or started: a taken port fails the launch here.
            if self.plan.mode == "trajectory":
                return self._run_trajectory()
            check_ports_free([s for s in self.plan.services if s.port is not None])
            self._open_run_dir()
            self._start_environment()
            self._start_inference()
            self._register_endpoints(initial=True)
            trainer = self._start(self.plan.trainer)
            logger.info("trainer started (pid %s); its log: %s", trainer.pid, trainer.log_path)
            return self._supervise(trainer)
        finally:
            self.shutdown()

    # ---- trajectory mode ------------------------------------------------------------------

    def _run_trajectory(self) -> int:
        plan = self.plan
        api_spec, policy = plan.trajectory_api, plan.policy
        assert api_spec is not None and policy is not None
        check_ports_free([api_spec, *trajectory_ports_to_check(policy)])
        self._open_run_dir()
        api = self._start(api_spec)
        logger.info("run-api started (pid %s), waiting for %s", api.pid, api_spec.health_url)
        wait_until_healthy([api], api_spec.start_timeout_s, plan.config.progress_interval_s)
        trainer = self._start(plan.trainer)
        logger.info("trainer started (pid %s); its log: %s", trainer.pid, trainer.log_path)
        code = self._wait_for_policy(trainer, api)
        if code is not None:
            return code
        for spec, env_cfg in zip(plan.environments, plan.config.environments, strict=True):
            proc = self._start(spec)
            logger.info("started %s (pid %s); its log: %s", spec.name, proc.pid, proc.log_path)
            self.env_keepers[spec.name] = EnvironmentKeeper(
                proc,
                env_cfg,
                label=f"environment {spec.name}",
                meanwhile="the trainer waits for batches",
                grace_s=plan.config.shutdown_grace_s,
                progress_interval_s=plan.config.progress_interval_s,
                on_change=self._write_state,
                start=lambda proc=proc: self._restart(proc),
            )
        self._write_state()
        return self._supervise(trainer, watched=[api])

    def _wait_for_policy(self, trainer: ManagedProcess, api: ManagedProcess) -> int | None:
        """Wait until the trainer's policy endpoint answers; the trainer's exit code if it exits first."""
        policy = self.plan.policy
        assert policy is not None
        logger.info("waiting for the trainer's policy endpoint: %s", policy.health_url)
        start = time.monotonic()
        next_progress = start + self.plan.config.progress_interval_s
        seen = "no answer yet"
        while True:
            code = trainer.poll()
            if code is not None:
                self._write_state()
                logger.info("trainer exited with code %s before its policy endpoint answered: ending the run", code)
                return _shell_exit_code(code)
            self._check_alive(api, "the trajectory API")
            healthy, seen = probe(policy.health_url)
            now = time.monotonic()
            if healthy:
                logger.info("policy endpoint is healthy (%s, %.1f s)", policy.health_url, now - start)
                return None
            if now - start >= policy.start_timeout_s:
                raise LaunchError(
                    f"the trainer's policy endpoint {policy.health_url} did not answer within "
                    f"{policy.start_timeout_s:g} s ({seen}); check launcher.policy_endpoint.base_url (by default it "
                    f"follows trainer.atropos.policy_gateway_port); last lines of "
                    f"{trainer.log_path}:\n{trainer.tail()}"
                )
            if now >= next_progress:
                logger.info(
                    "waiting for the policy endpoint (%s): %.0f s of %g s", seen, now - start, policy.start_timeout_s
                )
                next_progress = now + self.plan.config.progress_interval_s
            time.sleep(0.5)

    def _check_alive(self, proc: ManagedProcess, what: str) -> None:
        code = proc.poll()
        if code is not None:
            self._write_state()
            raise LaunchError(
                f"{what} ({proc.name}) exited with code {code}: ending the run; last lines of "
                f"{proc.log_path}:\n{proc.tail()}"
            )

    def _report_environments(self, trainer: ManagedProcess) -> None:
        """After a failed trajectory run: the trainer's error and what each environment logged."""
        from recipe.atropos.trajectory.diagnostics import environment_report, error_lines

        trainer_errors = error_lines(trainer.log_path, limit=3)
        logger.error(
            "the trainer's last error lines (%s):\n%s\nenvironments:\n%s",
            trainer.log_path,
            "\n".join(f"  {line}" for line in trainer_errors) or "  (none)",
            environment_report(self.plan.run_dir, errors=5) or "  (none started)",
        )

    # ---- evaluate mode --------------------------------------------------------------------

    def _start_environment(self) -> None:
        """The environment service and launcher.environment_services: started together, waited for
        together, each kept up by its own keeper (the first as ``self.keeper``)."""
        plan = self.plan
        specs = [plan.environment, *plan.environment_services]
        configs = [plan.config.environment, *plan.config.environment_services]
        procs = [self._start(spec) for spec in specs]
        for proc in procs:
            logger.info("environment service %s started (pid %s), waiting for %s", proc.name, proc.pid, proc.spec.health_url)
        wait_until_healthy(procs, max(spec.start_timeout_s for spec in specs), plan.config.progress_interval_s)
        for proc, cfg in zip(procs, configs, strict=True):
            keeper = EnvironmentKeeper(
                proc,
                cfg,
                label="environment service" if proc.spec is plan.environment else f"environment service {proc.name}",
                grace_s=plan.config.shutdown_grace_s,
                progress_interval_s=plan.config.progress_interval_s,
                # A restarted service has forgotten the inference endpoints registered with it.
                on_healthy=lambda spec=proc.spec: self._register_endpoints(initial=False, services=[spec]),
                on_change=self._write_state,
                start=lambda proc=proc: self._restart(proc),
            )
            if proc.spec is plan.environment:
                self.keeper = keeper
            else:
                self.env_keepers[proc.name] = keeper

    def _start_inference(self) -> None:
        if not self.plan.inference:
            return
        workers = [self._start(spec) for spec in self.plan.inference]
        names = ", ".join(f"{w.name} (pid {w.pid}, port {w.spec.port})" for w in workers)
        logger.info("inference workers started: %s; waiting for their health", names)
        wait_until_healthy(workers, self.plan.inference[0].start_timeout_s, self.plan.config.progress_interval_s)

    def _register_endpoints(self, *, initial: bool, services: list[ServiceSpec] | None = None) -> None:
        """POST every worker to ``/register_inference_endpoint`` of each environment service
        (default: all of them); a 404 means "not supported"."""
        if not self.plan.registrations:
            return
        for service in services or [self.plan.environment, *self.plan.environment_services]:
            self._register_with(service, initial=initial)

    def _register_with(self, service: ServiceSpec, *, initial: bool) -> None:
        from recipe.atropos.errors import AtroposAPIError
        from recipe.atropos.evaluate.client import AtroposEnvironmentClient  # numpy: only when needed

        with AtroposEnvironmentClient(
            service.base_url or "",
            timeout=10.0,
            retry_attempts=3,
            retry_delay=0.5,
            max_wait_time=30.0,
            api_key=self.plan.env_api_key,
            encoding="json",
        ) as client:
            for reg in self.plan.registrations:
                try:
                    supported = client.register_inference_endpoint(reg.base_url, reg.model, reg.api_key)
                except AtroposAPIError as exc:
                    message = f"registering {reg.worker} ({reg.base_url}) with {service.name} failed: {exc}"
                    if initial:
                        raise LaunchError(message) from exc
                    logger.warning("%s; going on without it", message)
                    return
                if not supported:
                    logger.info(
                        "%s does not support /register_inference_endpoint (404): "
                        "inference workers not registered, going on", service.name
                    )
                    return
                logger.info(
                    "registered %s (%s, model %s) with %s", reg.worker, reg.base_url, reg.model, service.name
                )

    def _supervise(self, trainer: ManagedProcess, watched: list[ManagedProcess] | None = None) -> int:
        poll_s = self.plan.config.poll_interval_s
        workers = [self.processes[s.name] for s in self.plan.inference]
        while True:
            code = trainer.poll()
            if code is not None:
                self._write_state()
                logger.info("trainer exited with code %s: ending the run", code)
                if code != 0 and self.plan.mode == "trajectory":
                    self._report_environments(trainer)
                return _shell_exit_code(code)
            for worker in workers:
                worker_code = worker.poll()
                if worker_code is not None:
                    self._write_state()
                    raise LaunchError(
                        f"inference worker {worker.name} exited with code {worker_code}: ending the run; "
                        f"last lines of {worker.log_path}:\n{worker.tail()}"
                    )
            for proc in watched or ():
                self._check_alive(proc, "the trajectory API")
            if self.keeper is not None:
                self.keeper.tick()
            for keeper in self.env_keepers.values():
                keeper.tick()
            time.sleep(poll_s)

    # ---- processes, state and logs ------------------------------------------------------

    def _open_run_dir(self) -> None:
        self.plan.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.plan.run_dir / "launcher.log")
        handler.setFormatter(logging.Formatter("%(asctime)s launcher %(levelname)s: %(message)s"))
        logging.getLogger("atropos.launcher").addHandler(handler)
        self._log_handler = handler
        logger.info("run folder: %s", self.plan.run_dir)

    def _start(self, spec: ServiceSpec) -> ManagedProcess:
        log_path = self.plan.run_dir / f"{spec.name}.log"
        proc = ManagedProcess(spec, log_path, self.plan.child_env(spec), Path(spec.cwd) if spec.cwd else self.plan.workdir)
        self.processes[spec.name] = proc
        with self._critical_section():
            proc.start()
        if self.echo is not None:
            self.echo.follow(spec.name, proc.log_path)
        self._write_state()
        return proc

    def _restart(self, proc: ManagedProcess) -> None:
        with self._critical_section():
            proc.start()

    def _write_state(self) -> None:
        """``services.json``: pid, port and status of every service (for people and for tests)."""
        if not self.plan.run_dir.is_dir():
            return
        services = {}
        for name, proc in self.processes.items():
            code = proc.poll()
            services[name] = {
                "pid": proc.pid,
                "status": "running" if code is None else f"exited {code}",
                "port": proc.spec.port,
                "url": proc.spec.base_url,
                "log": str(proc.log_path),
                "starts": proc.starts,
            }
        if self.keeper is not None:
            services["environment"]["restart_state"] = self.keeper.state
            services["environment"]["restarts"] = self.keeper.restarts
        for name, keeper in self.env_keepers.items():
            services[name]["restart_state"] = keeper.state
            services[name]["restarts"] = keeper.restarts
        state = {"launcher_pid": os.getpid(), "mode": self.plan.mode, "stopping": self.stopping, "services": services}
        path = self.plan.run_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)

    def shutdown(self) -> None:
        """Stop every process tree started here (SIGTERM, grace period, SIGKILL). Idempotent."""
        if self.stopping:
            return
        self.stopping = True
        running = [p for p in self.processes.values() if p.popen is not None]
        if running:
            alive = [p.name for p in running if p.running()]
            if alive:
                logger.info("stopping %s", ", ".join(reversed(alive)))
            terminate_all(reversed(running), self.plan.config.shutdown_grace_s)
        self._write_state()
        if self.echo is not None:
            self.echo.stop()
        if self._log_handler is not None:
            logging.getLogger("atropos.launcher").removeHandler(self._log_handler)
            self._log_handler.close()


def _shell_exit_code(code: int) -> int:
    """A child's exit status as a shell reports it: killed by signal N (Popen's -N) is 128 + N."""
    return code if code >= 0 else 128 - code

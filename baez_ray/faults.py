"""What the cluster looks like to a run: its nodes, alive or lost, and this job's actors
as the GCS sees them (a restarting actor, the resources it waits for), read without the
dashboard. `ray_pool.watch` polls these while a job runs; `progress` pins its Counter to
the driver's node with `on_driver_node`.

    ray.nodes()            ─▶ nodes(): id → alive, address, resources (totals)
    GCS actor table (job)  ─▶ job_actors(): name, state, restarts, node, required resources
    the two                ─▶ stuck(): actors waiting for resources that no alive node has

`Unplaceable` is what a run raises when such an actor waited longer than
`ray.unplaceable_timeout_s`: its message is the one line the CLI prints (exit code
EXIT_UNPLACEABLE, `cli.py`); the run directory keeps what was committed, and the same
command resumes once a node with the resource has joined.
"""

from __future__ import annotations

from dataclasses import dataclass

WAITING = ("RESTARTING", "PENDING_CREATION")  # GCS actor states of an actor not placed (yet)


class Unplaceable(BaseException):
    """An actor of the run cannot be placed: no node left has what it needs. A
    BaseException, as KeyboardInterrupt: no `except Exception` of a stage swallows it, and
    no stop-time snapshot waits on the actor that is gone."""

    resumable = True  # the run directory is left to resume (rundir.Run.stage: status "stopped")


@dataclass(frozen=True)
class Node:
    id: str
    alive: bool
    address: str
    resources: dict

    @property
    def name(self) -> str:
        """How a line names a node: its id's first 8 hex digits (Ray's own ids), and its address."""
        return f"{self.id[:8]} ({self.address})" if self.address else self.id[:8]


@dataclass(frozen=True)
class Actor:
    id: str
    name: str
    state: str
    restarts: int
    node: str  # the node it runs on, or ran on before it died ("" when never placed)
    required: dict


def nodes() -> dict[str, Node]:
    """Every node the GCS knows of this session, alive or dead."""
    import ray

    return {n["NodeID"]: Node(n["NodeID"], bool(n["Alive"]), n.get("NodeManagerAddress", ""), dict(n.get("Resources") or {}))
            for n in ray.nodes()}


def alive(node_id: str) -> bool:
    """Whether the node is alive (True when the GCS does not know it: never assume a loss)."""
    n = nodes().get(node_id)
    return n is None or n.alive


def short(node_id: str) -> str:
    return node_id[:8]


def job_actors() -> list[Actor]:
    """This driver's job's actors from the GCS actor table (Ray's private accessor: the
    public state API needs the dashboard, which a run does not start); [] when unreadable."""
    import ray

    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2

        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        raw = state._connect_and_get_accessor().get_actor_table(job, None)
    except Exception:  # noqa: BLE001 - another Ray version: the watch then sees no actor (no stop, no counts)
        return []
    out = []
    for b in raw:
        a = gcs_pb2.ActorTableData.FromString(b)
        out.append(Actor(a.actor_id.hex(), a.repr_name or a.class_name, gcs_pb2.ActorTableData.ActorState.Name(a.state),
                         int(a.num_restarts), (a.address.node_id or a.node_id).hex(), dict(a.required_resources)))
    return out


def fits(required: dict, node: Node) -> bool:
    return all(node.resources.get(k, 0.0) >= v for k, v in required.items() if v > 0)


def stuck(actors: list[Actor], cluster: dict[str, Node]) -> list[Actor]:
    """The actors waiting to be placed whose resources no alive node has (in total: an
    actor that waits for a busy node is not stuck)."""
    up = [n for n in cluster.values() if n.alive]
    return [a for a in actors if a.state in WAITING and not any(fits(a.required, n) for n in up)]


def resources_text(required: dict) -> str:
    """{'spot': 1.0, 'CPU': 0.5} → 'spot: 1, CPU: 0.5' (custom resources first)."""
    keys = sorted(required, key=lambda k: (k in ("CPU", "GPU", "memory"), k))
    return ", ".join(f"{k}: {required[k]:g}" for k in keys if required[k] > 0)


def lost_node(actor: Actor, last_node: str, known: dict[str, Node], cluster: dict[str, Node]) -> Node | None:
    """The lost node an actor waits to replace: the one it last ran on (`last_node`, as the
    watch saw it), else a lost node that had one of its custom resources (`known`: nodes as
    they were while alive; a dead node's entry in the GCS no longer lists its resources)."""
    def dead(node_id: str) -> bool:
        return node_id in cluster and not cluster[node_id].alive

    if last_node and dead(last_node):
        return known.get(last_node) or cluster[last_node]
    custom = [k for k in actor.required if k not in ("CPU", "GPU", "memory")] or list(actor.required)
    had = [n for n in known.values() if dead(n.id) and any(k in n.resources for k in custom)]
    return had[0] if had else None


def stuck_line(actor: Actor, lost: Node | None, cluster: dict[str, Node], waited_s: float, run_dir: str) -> str:
    """The one line a run stops with when `actor` cannot be placed."""
    where = f"lost node {lost.name}" if lost else "a lost node"
    missing = {k: v for k, v in actor.required.items() if not any(n.alive and n.resources.get(k, 0.0) >= v for n in cluster.values())}
    return (f"{where}: {actor.name} waits for {resources_text(missing or actor.required)}, which no node left has "
            f"(waited {waited_s:.0f} s); rerun the same command once such a node has joined: {run_dir} resumes")


def on_driver_node() -> dict:
    """Ray options that keep a small actor on the driver's node (the progress Counter, a
    kept pool's turn keeper): it lives as long as the run, whatever worker node is lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}

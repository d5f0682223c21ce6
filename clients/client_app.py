"""The Flower ClientApp: a thin adapter from Messages to :class:`clients.hospital.Hospital`."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.hospital import Hospital
from sims.config import config_from_run_config

app = ClientApp()


def _hospital(context: Context) -> Hospital:
    config = config_from_run_config(context.run_config)
    return Hospital.from_partition(
        config, int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train locally, reply with weights and per-site metrics."""
    hospital = _hospital(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    model = hospital.new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    result = hospital.train(model, server_round, proximal_mu=float(config.get("proximal-mu", 0.0)))
    metrics = MetricRecord(
        {
            "train_loss": result.loss,
            "steps": result.steps,
            "num-examples": result.num_examples,
            "site": hospital.site,
            "server-round": server_round,
        }
    )
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's test split."""
    hospital = _hospital(context)
    model = hospital.new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    scores, n = hospital.evaluate(model, "test")
    metrics = MetricRecord(
        {
            **scores,
            "num-examples": n,
            "site": hospital.site,
            "server-round": int(msg.content["config"]["server-round"]),
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

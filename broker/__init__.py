"""The broker: the public `velesio.v1.Inference` service, the Redis job queue, the dispatcher that runs
jobs on registered workers, and the event relay that lets any replica serve any job's stream."""

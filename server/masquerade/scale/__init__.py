"""Scale-out: the same masquerade.v1.Anonymizer contract served by many engines on Ray Serve.

``masquerade serve --ray-replicas N`` keeps the gRPC server in its own process (the
front end) and runs N engine replicas as a Ray Serve deployment, one engine (models
plus step-level batching) per replica on one GPU. Each RPC becomes one streaming call
on the deployment's handle; Ray's router sends it to a replica with room.

Why a thin front end over deployment handles, not Ray Serve's gRPC ingress:

- One contract, one implementation. Validation, status codes, progress throttling and
  result conversion run on the replica with the single-process server's own code
  (``masquerade.api.convert``, ``status_for``, ``ProgressThrottle``); nothing is
  re-expressed in Ray's proxy conventions (user methods called with a proto and a
  ``grpc_context``; errors surfacing as INTERNAL unless each path sets a code).
- Standard gRPC health and reflection on the served port. Ray's proxy answers its own
  ``ray.serve.RayServeAPIService/Healthz``, which Kubernetes' gRPC probes, grpcurl and
  ``grpc_health_probe`` do not speak, and offers no server reflection.
- Per-request routing inside AnonymizeBatch. Through the ingress a bidirectional
  stream is pinned to one replica for its whole life; here each image of the stream is
  routed on its own, so one client's batch spreads over every replica.
- Faults map to the right codes. A replica that dies fails exactly its in-flight calls
  with ``ActorDiedError``, which the front end answers UNAVAILABLE (clients retry);
  Serve's back-pressure becomes RESOURCE_EXHAUSTED.
- Fewer processes: no HTTP or gRPC proxy actors (``http_options.location=NoServer``).

The cost is one more hop (front end -> replica) carrying the encoded image and the
result, small next to a diffusion request, and a front end that is one process.
On Kubernetes (deploy/kuberay) the same front end runs inside each engine replica
on its GPU worker pod (``masquerade.scale.app.FrontEndThread``), still routing
every request through the deployment handle, so there is no single front-end pod.
"""

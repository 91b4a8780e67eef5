"""The OpenAI Batch API (`/v1/files`, `/v1/batches`) over BatchInference custom resources.

`troughfill api` serves it. A batch is a BatchInference (its id is `batch_<name>`: the custom
resource is the single source of truth, and one made with kubectl is listed too); a file is an
object under the caller's namespace's storage grant. Callers authenticate with a token the
cluster accepts (TokenReview) and act in a namespace only where SubjectAccessReview lets them
use batchinferences there.

- `wire`: the OpenAI objects and errors, as pydantic models (they also make /openapi.json).
- `mapping`: pure translation between those and BatchInference.
- `ports`: what the server needs from the cluster (adapters in troughfill.kube.batchapi).
- `files`: uploaded files in the object store.
- `server`: the aiohttp application.
"""

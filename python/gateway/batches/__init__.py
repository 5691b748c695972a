"""The OpenAI Batch API (issue 16 item 3): `/v1/files` and `/v1/batches`, run on the job queue
(`gateway.jobs`) in a lane below interactive traffic.

`multipart` (the upload's form), `jsonl` (input validation), `store` (file and batch objects in
Redis, bytes in the object store), `runner` (a batch is one job in the batch lane that runs its
lines through the pipeline), `routes` (the HTTP side)."""

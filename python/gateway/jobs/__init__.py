"""Async requests (`Prefer: respond-async`) and the Redis job queue they run from: `queue`
(the state machine in Lua), `runner` (each gateway worker runs jobs through its own pipeline),
`routes` (submit, `/v1/jobs/{id}`, cancel, status events over SSE). See issue 16."""

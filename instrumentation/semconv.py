"""The contract between what agents emit and what the collector and trainer read.

This is a leaf module: standard library only, nothing of ours. It names

* the span attributes tracetrain reads (OTel GenAI ``gen_ai.*`` keys where a
  convention exists, ``tracetrain.*`` keys where none does), and
* the columns of the span tables the collector writes and the trainer reads.

Everything else refers to these constants, so a rename happens here and nowhere
else. ``docs/schema.md`` documents the same names; ``tests`` check the two agree.
"""

from __future__ import annotations

from typing import Final

# ---------------------------------------------------------------- schema version

SCHEMA_VERSION: Final = 1
"""Version of the span-table layout. Stored in every Parquet file's key-value
metadata (``tracetrain.schema_version``) and in ``DATA/store.json``; bump it with a
migration note in docs/schema.md whenever a column changes meaning or type."""

PARQUET_SCHEMA_VERSION_KEY: Final = "tracetrain.schema_version"
"""Parquet key-value metadata key that records SCHEMA_VERSION in each file."""

# ---------------------------------------------------------------- OTel GenAI keys

GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
"""``chat``, ``text_completion``, ``execute_tool``, ``invoke_agent``, ... (OTel GenAI)."""
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
"""Provider (OTel GenAI >= 1.37)."""
GEN_AI_SYSTEM: Final = "gen_ai.system"
"""Provider, deprecated predecessor of ``gen_ai.provider.name`` (OTel GenAI <= 1.36)."""
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
"""Model name asked for."""
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
"""Model name that answered (a LoRA adapter name on vLLM)."""
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
"""Completion id (``chatcmpl-...``)."""
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
"""Prompt tokens (OTel GenAI >= 1.27)."""
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
"""Completion tokens (OTel GenAI >= 1.27)."""
GEN_AI_USAGE_PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
"""Prompt tokens, deprecated key still sent by vLLM and older instrumentations."""
GEN_AI_USAGE_COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
"""Completion tokens, deprecated key still sent by vLLM and older instrumentations."""
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
"""Chat history sent to the model (JSON string or structured value)."""
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
"""Messages the model returned, one per choice."""
GEN_AI_SYSTEM_INSTRUCTIONS: Final = "gen_ai.system_instructions"
"""System prompt for APIs that take it apart from the history."""
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
"""Name of the agent that made the call (set on agent spans and often propagated)."""
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
"""Conversation / session id."""
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
"""Tool name on ``execute_tool`` spans."""
OPENINFERENCE_TOKEN_COUNT_PROMPT: Final = "llm.token_count.prompt"
"""OpenInference prompt token count."""
OPENINFERENCE_TOKEN_COUNT_COMPLETION: Final = "llm.token_count.completion"
"""OpenInference completion token count."""
OPENINFERENCE_MODEL_NAME: Final = "llm.model_name"
"""OpenInference model name."""
SERVICE_NAME: Final = "service.name"
"""Resource attribute naming the emitting service (OTel resource semconv)."""

# ---------------------------------------------------------------- tracetrain keys

INPUT_TOKEN_IDS: Final = "tracetrain.input.token_ids"
"""int[]: prompt token ids exactly as the server tokenized them."""
OUTPUT_TOKEN_IDS: Final = "tracetrain.output.token_ids"
"""int[]: response token ids exactly as sampled."""
OUTPUT_LOGPROBS: Final = "tracetrain.output.logprobs"
"""double[]: behaviour log-probability of each response token (same length as ids)."""
POLICY_VERSION: Final = "tracetrain.policy.version"
"""int: policy version (weight push counter) that produced the response."""
REWARD: Final = "tracetrain.reward"
"""double: a reward for the episode (or for the call, on an LLM span)."""
REWARD_SOURCE: Final = "tracetrain.reward.source"
"""string: who gave the reward (``grader``, ``unit_tests``, ``user``...)."""
EPISODE_ID: Final = "tracetrain.episode.id"
"""string|int: one run of the agent on one task."""
TASK_ID: Final = "tracetrain.task.id"
"""string|int: the task an episode attempts; GRPO groups by it."""
ROLLOUT_ID: Final = "tracetrain.rollout.id"
"""string: one sample of a task within a rollout group."""
ROLLOUT_GROUP: Final = "tracetrain.rollout.group"
"""string|int: the group of samples drawn for one task."""

# ---------------------------------------------------------------- span-table columns

COL_TRACE_ID: Final = "trace_id"
COL_SPAN_ID: Final = "span_id"
COL_PARENT_SPAN_ID: Final = "parent_span_id"
COL_NAME: Final = "name"
COL_KIND: Final = "kind"
COL_START_NS: Final = "start_time_unix_nano"
COL_END_NS: Final = "end_time_unix_nano"
COL_STATUS_CODE: Final = "status_code"
COL_STATUS_MESSAGE: Final = "status_message"
COL_SERVICE_NAME: Final = "service_name"
COL_RESOURCE_ATTRIBUTES: Final = "resource_attributes"
COL_SCOPE_NAME: Final = "scope_name"
COL_SCOPE_VERSION: Final = "scope_version"
COL_ATTRIBUTES: Final = "attributes"
COL_EVENTS: Final = "events"
COL_LINKS: Final = "links"
COL_TRACE_STATE: Final = "trace_state"
COL_RECEIVED_NS: Final = "received_unix_nano"
COL_OPERATION: Final = "gen_ai_operation"
COL_PROVIDER: Final = "gen_ai_provider"
COL_REQUEST_MODEL: Final = "request_model"
COL_RESPONSE_MODEL: Final = "response_model"
COL_RESPONSE_ID: Final = "response_id"
COL_INPUT_TOKENS: Final = "input_tokens"
COL_OUTPUT_TOKENS: Final = "output_tokens"
COL_INPUT_MESSAGES: Final = "input_messages"
COL_OUTPUT_MESSAGES: Final = "output_messages"
COL_SYSTEM_INSTRUCTIONS: Final = "system_instructions"
COL_PROMPT_TOKEN_IDS: Final = "prompt_token_ids"
COL_RESPONSE_TOKEN_IDS: Final = "response_token_ids"
COL_RESPONSE_LOGPROBS: Final = "response_logprobs"
COL_REWARD: Final = "reward"
COL_POLICY_VERSION: Final = "policy_version"
COL_EPISODE_ID: Final = "episode_id"
COL_TASK_ID: Final = "task_id"
COL_ROLLOUT_ID: Final = "rollout_id"
COL_AGENT_NAME: Final = "agent_name"
COL_CONVERSATION_ID: Final = "conversation_id"

# Attributes promoted to typed columns and therefore NOT repeated in the JSON
# ``attributes`` column (they are the bulky ones: storing them twice would double
# the store). Every other attribute stays in ``attributes`` as well.
PROMOTED_ATTRIBUTE_COLUMNS: Final = {
    GEN_AI_INPUT_MESSAGES: COL_INPUT_MESSAGES,
    GEN_AI_OUTPUT_MESSAGES: COL_OUTPUT_MESSAGES,
    GEN_AI_SYSTEM_INSTRUCTIONS: COL_SYSTEM_INSTRUCTIONS,
    INPUT_TOKEN_IDS: COL_PROMPT_TOKEN_IDS,
    OUTPUT_TOKEN_IDS: COL_RESPONSE_TOKEN_IDS,
    OUTPUT_LOGPROBS: COL_RESPONSE_LOGPROBS,
}

# Table and view names.
TABLE_SPANS: Final = "spans"
VIEW_LLM_CALLS: Final = "llm_calls"
VIEW_EPISODES: Final = "episodes"

# ---------------------------------------------------------------- other conventions (normalized by the collector)
# docs/conventions.md maps each of them onto the span-table columns.

OPENINFERENCE_SPAN_KIND: Final = "openinference.span.kind"
"""OpenInference: ``LLM``, ``EMBEDDING``, ``CHAIN``, ``TOOL``, ``AGENT``, ... (on every span)."""
OPENINFERENCE_INPUT_MESSAGES: Final = "llm.input_messages"
"""OpenInference prefix: ``llm.input_messages.<i>.message.{role, content, ...}``."""
OPENINFERENCE_OUTPUT_MESSAGES: Final = "llm.output_messages"
"""OpenInference prefix: ``llm.output_messages.<i>.message.{role, content, tool_calls...}``."""
OPENINFERENCE_REQUEST_MODEL_NAME: Final = "llm.request.model_name"
"""OpenInference model asked for (newer than ``llm.model_name``)."""
OPENINFERENCE_RESPONSE_MODEL_NAME: Final = "llm.response.model_name"
"""OpenInference model that answered."""
OPENINFERENCE_PROVIDER: Final = "llm.provider"
"""OpenInference hosting provider (``openai``, ``azure``, ...)."""
OPENINFERENCE_SYSTEM: Final = "llm.system"
"""OpenInference model vendor (``openai``, ``anthropic``, ...)."""
OPENINFERENCE_AGENT_NAME: Final = "agent.name"
"""OpenInference agent name."""
OPENINFERENCE_SESSION_ID: Final = "session.id"
"""OpenInference session id (maps to the conversation id)."""
TRACELOOP_REQUEST_TYPE: Final = "llm.request.type"
"""Traceloop <= 0.54: ``chat``, ``completion``, ``embedding``, ``rerank``."""
TRACELOOP_PROMPT_PREFIX: Final = "gen_ai.prompt"
"""Traceloop <= 0.54 prefix: ``gen_ai.prompt.<i>.{role, content, tool_call_id, tool_calls.<j>...}``."""
TRACELOOP_COMPLETION_PREFIX: Final = "gen_ai.completion"
"""Traceloop <= 0.54 prefix: ``gen_ai.completion.<i>.{role, content, finish_reason, tool_calls.<j>...}``."""
TRACELOOP_SPAN_KIND: Final = "traceloop.span.kind"
"""Traceloop SDK decorator spans: ``workflow``, ``task``, ``agent``, ``tool``."""
TRACELOOP_ENTITY_NAME: Final = "traceloop.entity.name"
"""Traceloop SDK entity name (the agent's name when ``traceloop.span.kind`` is ``agent``)."""
GEN_AI_REQUEST_ID: Final = "gen_ai.request.id"
"""vLLM ``llm_request`` server spans: the request id (``chatcmpl-...``)."""
VLLM_SERVER_SPAN_NAME: Final = "llm_request"
"""Name of the SERVER span vLLM emits per request (no model, no content)."""
VLLM_LATENCY_PREFIX: Final = "gen_ai.latency."
"""vLLM latency attributes: ``gen_ai.latency.{e2e, time_to_first_token, time_in_queue, ...}`` (seconds)."""
EVENT_NAME: Final = "event.name"
"""Log-record attribute naming an event (older SDKs; newer ones use the LogRecord ``event_name`` field)."""
GEN_AI_OPERATION_DETAILS_EVENT: Final = "gen_ai.client.inference.operation.details"
"""Log event of the contrib instrumentations carrying ``gen_ai.input.messages`` / ``gen_ai.output.messages``."""

# ---------------------------------------------------------------- delayed rewards (tracetrain reward, FeedbackService)

REWARD_NAME: Final = "tracetrain.reward.name"
"""string: which reward this is (``user_feedback``, ``tests_passed``...)."""
REWARD_ID: Final = "tracetrain.reward.id"
"""string: idempotency key of a delayed reward; the same id twice counts once."""
REWARD_DELAYED: Final = "tracetrain.reward.delayed"
"""bool: true on reward spans written by the collector's feedback service."""
FEEDBACK_SCOPE_NAME: Final = "tracetrain.feedback"
"""Instrumentation scope of the reward spans the feedback service writes."""
FEEDBACK_SERVICE_NAME: Final = "tracetrain-feedback"
"""``service.name`` of the reward spans the feedback service writes."""

# ---------------------------------------------------------------- log-record table (OTLP logs)

TABLE_LOGS: Final = "logs"
COL_TIME_NS: Final = "time_unix_nano"
COL_OBSERVED_NS: Final = "observed_time_unix_nano"
COL_SEVERITY_NUMBER: Final = "severity_number"
COL_SEVERITY_TEXT: Final = "severity_text"
COL_EVENT_NAME: Final = "event_name"
COL_BODY: Final = "body"
COL_RECORD_ID: Final = "record_id"
COL_MESSAGE: Final = "message"
COL_MESSAGE_DIRECTION: Final = "message_direction"
COL_MESSAGE_INDEX: Final = "message_index"
COL_RECORD_SEQ: Final = "seq"

# ---------------------------------------------------------------- in-process capture (instrumentation/openai_capture.py)
# Written by tracetrain's OpenAI-client instrumentor onto the LLM span; see docs/capture.md.

TOKEN_IDS_UNAVAILABLE_REASON: Final = "tracetrain.token_ids.unavailable_reason"
"""string, set only when an LLM span carries no token ids, saying why: ``rejected_by_endpoint``
(the endpoint refused ``return_token_ids``/``logprobs``), ``not_in_response`` (asked, not returned),
``capture_disabled`` (TRACETRAIN_CAPTURE_TOKEN_IDS=false), ``hosted_api`` (a known non-vLLM API),
``raw_response`` (``with_raw_response`` calls are not augmented), ``capture_error`` (tracetrain's
own wrapper failed; the call itself went through)."""
OUTPUT_CHOICE_COUNT: Final = "tracetrain.output.choice_count"
"""int: number of choices in the response when it is more than one (``n>1``). Choice 0 is in
OUTPUT_TOKEN_IDS / OUTPUT_LOGPROBS; the others in the per-choice keys below."""
OUTPUT_CHOICE_TOKEN_IDS_TEMPLATE: Final = "tracetrain.output.choice.{index}.token_ids"
"""int[]: response token ids of choice ``index`` >= 1 (``.format(index=i)``); choice 0 uses OUTPUT_TOKEN_IDS."""
OUTPUT_CHOICE_LOGPROBS_TEMPLATE: Final = "tracetrain.output.choice.{index}.logprobs"
"""double[]: logprobs of choice ``index`` >= 1; choice 0 uses OUTPUT_LOGPROBS."""
POLICY_VERSION_HEADER: Final = "x-tracetrain-policy-version"
"""HTTP response header (integer) by which a serving endpoint or proxy tells which policy version
answered; the instrumentor copies it into POLICY_VERSION."""
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
"""int: max tokens asked for (OTel GenAI)."""
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
"""double: sampling temperature asked for (OTel GenAI)."""
GEN_AI_REQUEST_CHOICE_COUNT: Final = "gen_ai.request.choice.count"
"""int: ``n``, the number of choices asked for (OTel GenAI)."""
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
"""string[]: finish reason of each choice (OTel GenAI)."""
SERVER_ADDRESS: Final = "server.address"
"""Host of the endpoint called (OTel)."""
SERVER_PORT: Final = "server.port"
"""Port of the endpoint called (OTel)."""

# ---------------------------------------------------------------- training tables (written by the trainer)
# The trainer writes these under DATA/training/ as immutable Parquet files (one per step or
# checkpoint, atomic rename); the collector's reader exposes them as views so the dashboard,
# ``tracetrain sql`` and ``tracetrain plot`` read them like the span tables. Columns are
# (name, DuckDB type) pairs so this module stays stdlib-only.

TRAINING_DIR: Final = "training"
"""DATA/training/: everything the trainer writes into the store."""
TABLE_TRAIN_STEPS: Final = "train_steps"
"""One row per optimizer step (or APO round): DATA/training/train_steps/run=<run_id>/step-<NNNNNNNNNN>.parquet."""
TABLE_CHECKPOINTS: Final = "checkpoints"
"""One row per saved checkpoint with its lineage: DATA/training/checkpoints/run=<run_id>/ckpt-<NNNNNNNNNN>.parquet."""

TRAIN_STEP_COLUMNS: Final = (
    ("run_id", "VARCHAR"),            # one `tracetrain train` run (survives restarts)
    ("step", "BIGINT"),               # optimizer step, 1-based, monotonic within a run
    ("time_unix_nano", "BIGINT"),     # when the step finished
    ("algo", "VARCHAR"),              # grpo | ppo | sft | apo
    ("agent_name", "VARCHAR"),        # the policy trained (NULL: all agents, one policy)
    ("policy_version", "BIGINT"),     # version serving after this step's push (NULL: not pushed)
    ("n_episodes", "BIGINT"),         # episodes used in the step
    ("n_transitions", "BIGINT"),      # LLM calls (or merged sequences) used
    ("n_tokens", "BIGINT"),           # response tokens trained on
    ("reward_mean", "DOUBLE"),        # mean episode reward of the batch
    ("success_rate", "DOUBLE"),       # share of batch episodes with reward >= success threshold
    ("loss", "DOUBLE"),
    ("kl", "DOUBLE"),                 # mean KL to the reference (NULL when not computed)
    ("clip_fraction", "DOUBLE"),      # share of response tokens whose ratio was clipped
    ("staleness_mean", "DOUBLE"),     # mean (current version - behaviour version) over transitions
    ("tokens_per_s", "DOUBLE"),       # response tokens trained per second of update
    ("step_s", "DOUBLE"),             # wall seconds of the whole step
    ("push_s", "DOUBLE"),             # wall seconds of the weight push (NULL: not pushed)
    ("eval_success", "DOUBLE"),       # held-out success when an eval ran at this step
    ("skipped", "VARCHAR"),           # JSON {reason: count} of calls/episodes left out of the batch
)
"""Columns of ``train_steps`` in order."""

CHECKPOINT_COLUMNS: Final = (
    ("run_id", "VARCHAR"),
    ("step", "BIGINT"),
    ("time_unix_nano", "BIGINT"),
    ("agent_name", "VARCHAR"),
    ("policy_version", "BIGINT"),     # version pushed from this checkpoint (NULL: not pushed)
    ("path", "VARCHAR"),              # checkpoint folder
    ("episode_ids", "VARCHAR[]"),     # episodes trained on since the previous checkpoint
    ("trained_policy_versions", "BIGINT[]"),  # behaviour policy versions of those episodes
)
"""Columns of ``checkpoints`` in order."""

# ---------------------------------------------------------------- the store's own view definitions

VIEWS_FILE: Final = "views.sql"
"""DATA/views.sql: the SQL that defines every view (``spans``, ``llm_calls``, ``episodes``,
``train_steps``...) over the store's files, written by the collector. Paths in it are written
relative to VIEWS_DATA_PLACEHOLDER, which a reader replaces with the store's path; this is how
the trainer (or any DuckDB user) gets the same views without importing the collector."""
VIEWS_DATA_PLACEHOLDER: Final = "__TRACETRAIN_DATA__"
"""Stands for the store's directory in VIEWS_FILE."""

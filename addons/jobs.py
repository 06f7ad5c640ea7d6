"""Jobs: async jobs created through Candela are recorded, read only by their creator, and trued up
to their real cost when their result is read."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from candela_mitm import errors
from candela_mitm.audit.actions import LLM_REQUEST
from candela_mitm.context import RequestContext
from candela_mitm.governance.jobs import (
    batch_file_models,
    job_cost,
    other_batch_models,
    unpriced_model,
    upload_record,
    upload_refusal,
)
from candela_mitm.governance.ledger import TrueUp
from candela_mitm.providers.batchfile import parse_upload
from candela_mitm.providers.jobs import (
    batch_output_usage,
    batch_results_usage,
    job_final_usage,
    job_id_from,
)
from candela_mitm.providers.usage import Usage
from candela_mitm.runtime import Runtime

from .accounting import account_flow
from .audit import audit_path
from .flowstate import answered, ctx_of, decoded_body, deny, fail_closed, only_when
from .modelpolicy import check_model

log = logging.getLogger("candela.jobs")

# a job's creation answer or result above this is parsed on a worker thread, not the event loop
PARSE_ON_LOOP_BYTES = 64 * 1024


def true_up_entry(
    c: RequestContext, flow: http.HTTPFlow, t: TrueUp, usage: Usage
) -> dict[str, Any]:
    """The llm_request entry of a true-up: `cost_usd` is what it changed (negative: a refund),
    so that the entries of a job (its creation, then this) sum to its real cost."""
    job = t.job
    plan = c.plan
    return {
        "user_id": job.user_id,  # the spend is the creator's, whoever read the result
        "tenant_id": job.tenant or None,
        "read_by": c.user,
        "provider": job.provider,
        "model": job.model or None,
        "method": flow.request.method,
        "route": c.kind,
        "path": audit_path(c, flow),
        "operation": plan.operation.name if plan else None,
        "decision": "allowed",
        "reason": "job_true_up",
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_tokens": usage.cached_tokens,
        "cost_usd": round(t.adjustment_usd, 10),
        "usage_source": "reported",
        "job_id": job.job_id,
        "job_cost_usd": round(t.cost_usd, 10),
        "job_charged_usd": round(t.charged_usd, 10),  # at its creation (its reservation)
        "job_reservation_id": job.reservation_id,
        # the request it settles is the job's creation (as a crash settlement names its
        # request); the read that brought the usage is named apart
        "span_id": job.request_id or None,
        "read_span_id": c.span_id,
        "trace_id": c.trace.trace_id,
    }


def _job_operation(c: RequestContext | None) -> bool:
    return c is not None and c.plan is not None and c.plan.operation.job is not None


def _job_check(c: RequestContext | None) -> bool:
    """Whether Jobs.request checks anything for the flow's plan: a batch's models, a batch's
    input file uploaded or named, a job's result read by its owner. A chat has none."""
    if c is None or c.plan is None:
        return False
    plan, op = c.plan, c.plan.operation
    return (
        plan.batch is not None
        or op.billing == "batch_input"
        or op.model == "file"
        or (op.billing == "job_result" and plan.job_id is not None)
    )


class Jobs:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    @only_when(lambda self, flow: _job_check(ctx_of(flow)))
    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        c = ctx_of(flow)
        if c is None or answered(flow) or c.plan is None:
            return
        plan = c.plan
        if plan.batch is not None:
            self._check_batch(flow, c)
            return
        if plan.operation.billing == "batch_input":
            await self._check_upload(flow, c)
            return
        if plan.operation.model == "file":
            await self._check_batch_file(flow, c)
            return
        if plan.operation.billing != "job_result" or plan.job_id is None:
            return
        # a job's result goes only to the user who created it through Candela, or an admin
        provider = plan.upstream.name
        job_id: object = plan.job_id
        if plan.operation.results == "output_file":  # {job_id} names the batch's output file
            link = await self.rt.store_call(
                self.rt.ledger.job_object, provider, "output:" + plan.job_id
            )
            job_id = link.get("job_id") if link else None
        job = (
            await self.rt.store_call(self.rt.ledger.job, provider, job_id)
            if isinstance(job_id, str)
            else None
        )
        p = c.principal
        if job is None or p is None or (job.user_id != p.user and p.role != "admin"):
            deny(flow, errors.job_not_owned(provider, plan.job_id))
            return
        c.job = job
        c.client_host = flow.request.host_header

    def _models_pass(
        self, flow: http.HTTPFlow, c: RequestContext, models: list[str], route: str
    ) -> bool:
        """Each model passes the policy (audited) and has a price; the first that does not is
        refused (403 model_not_allowed, 402 model_price_unknown)."""
        for model in models:
            if not check_model(self.rt, flow, c, model, route):
                return False
        if self.rt.config.governance.unknown_model_price == "deny":
            unpriced = unpriced_model(models, lambda m: self.rt.pricing.get(m, route))
            if unpriced is not None:
                deny(flow, errors.model_price_unknown(unpriced))
                return False
        return True

    async def _check_upload(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """A batch's input file: every line read (bounded by limits.max_body_bytes, parsed off
        the event loop), every model checked, and the most its requests can cost computed, to be
        recorded with its owner once the provider names the file."""
        plan = c.plan
        assert plan is not None
        route = plan.upstream.name
        raw = await decoded_body(flow, self.rt.config.limits.max_body_bytes)
        if raw is None:
            return
        parsed = await self.rt.blocking(
            parse_upload, raw, flow.request.headers.get("content-type", "")
        )
        refusal = upload_refusal(parsed, route)
        if refusal is not None:
            deny(flow, refusal)
            return
        assert not isinstance(parsed, str)
        if not self._models_pass(flow, c, list(parsed.models), route):
            return
        p = c.principal
        c.job_input = await self.rt.blocking(
            upload_record,
            parsed,
            p.user if p is not None else None,
            c.tenant or "",
            self.rt.config.governance.budgets.default_max_output_tokens,
            lambda m: self.rt.pricing.get(m, route),
        )

    async def _check_batch_file(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """A batch names its input file: one its creator uploaded through Candela, whose models
        pass the policy now too; the batch is then reserved what the file's requests can cost."""
        plan = c.plan
        assert plan is not None
        route = plan.upstream.name
        file_id = (c.body or {}).get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            deny(flow, errors.bad_request("'input_file_id' is required"))
            return
        record = await self.rt.store_call(self.rt.ledger.job_object, route, "file:" + file_id)
        p = c.principal
        models = batch_file_models(record, p.user if p is not None else None)
        if models is None:
            deny(flow, errors.batch_file_not_governed(route, file_id))
            return
        if not self._models_pass(flow, c, models, route):
            return
        plan.model = models[0]  # the batch is recorded (and priced) under its first model
        c.job_input = record

    def _check_batch(self, flow: http.HTTPFlow, c: RequestContext) -> None:
        """Every request of a batch passes the model policy (ModelPolicy checked the first:
        the batch is planned under it) and has a price, before anything is reserved."""
        plan = c.plan
        assert plan is not None and plan.batch is not None
        self._models_pass(flow, c, other_batch_models(plan.batch, plan.model), plan.upstream.name)

    @only_when(lambda self, flow: _job_operation(ctx_of(flow)))
    async def response(self, flow: http.HTTPFlow) -> None:
        # Before Budget's response hook (it settles the creation's reservation): the job is
        # recorded under that reservation while it is still on the context.
        c = ctx_of(flow)
        resp = flow.response
        if c is None or c.plan is None or resp is None or c.plan.operation.job is None:
            return
        if not c.forwarded or c.denial_code or resp.status_code != 200:
            return
        try:
            if c.plan.operation.billing == "batch_input" and c.job_input is not None:
                await self._record_input(c, resp)
            elif c.plan.operation.billing == "async":
                await self._record(flow, c, resp)
            elif c.plan.operation.billing == "job_result" and c.job is not None:
                if c.plan.operation.job == "anthropic.batch" and not c.intercepted:
                    point_results_here(flow, c, resp)
                if c.plan.operation.job == "openai.batch" and c.plan.operation.results == "json":
                    await self._link_output(c, resp)
                await self._true_up(flow, c, resp)
        except Exception:
            # the answer has come back already: a job not recorded stays charged its
            # reservation (and unreadable), a result not trued up leaves the job as charged
            log.exception("async job bookkeeping failed (span %s)", c.span_id)

    async def _body(self, resp: http.Response) -> object:
        raw = resp.content or b""
        if "json" not in resp.headers.get("content-type", ""):
            return None
        try:
            if len(raw) > PARSE_ON_LOOP_BYTES:
                return await self.rt.blocking(json.loads, raw)
            return json.loads(raw)
        except ValueError:
            return None

    async def _record_input(self, c: RequestContext, resp: http.Response) -> None:
        """The uploaded file, under the id the provider gave it: its owner, models and cost."""
        plan = c.plan
        assert plan is not None and c.job_input is not None
        obj = await self._body(resp)
        file_id = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(file_id, str) and file_id:
            await self.rt.store_call(
                self.rt.ledger.record_job_object, plan.upstream.name, "file:" + file_id,
                c.job_input,
            )

    async def _link_output(self, c: RequestContext, resp: http.Response) -> None:
        """A finished OpenAI batch names its output file: reading it is reading the batch."""
        plan, job = c.plan, c.job
        assert plan is not None and job is not None
        obj = await self._body(resp)
        out = obj.get("output_file_id") if isinstance(obj, dict) else None
        if isinstance(out, str) and out:
            await self.rt.store_call(
                self.rt.ledger.record_job_object, plan.upstream.name, "output:" + out,
                {"job_id": job.job_id},
            )

    async def _record(self, flow: http.HTTPFlow, c: RequestContext, resp: http.Response) -> None:
        plan, res = c.plan, c.reservation
        assert plan is not None and plan.operation.job is not None
        if res is None:
            return
        job_id = job_id_from(plan.operation.job, await self._body(resp))
        if job_id is None:
            return
        account_flow(self.rt, flow, c)  # what Budget settles next: the job's charge
        if c.usage_source is None:
            return  # nothing charged: the provider refused it
        await self.rt.store_call(
            self.rt.ledger.record_job,
            res,
            plan.upstream.name,
            job_id,
            plan.model or "",
            c.cost_usd,
            c.usage.input_tokens,
            c.usage.output_tokens,
        )

    async def _usages(
        self, c: RequestContext, resp: http.Response
    ) -> list[tuple[str | None, Usage]] | None:
        """The final usage a result reports, per model (None: the job's own), or None."""
        plan = c.plan
        assert plan is not None and plan.operation.job is not None
        if plan.operation.results == "jsonl":
            return await self.rt.blocking(batch_results_usage, resp.content or b"")
        if plan.operation.results == "output_file":
            return await self.rt.blocking(batch_output_usage, resp.content or b"")
        usage = job_final_usage(plan.operation.job, await self._body(resp))
        return None if usage is None else [(None, usage)]

    async def _true_up(self, flow: http.HTTPFlow, c: RequestContext, resp: http.Response) -> None:
        plan, job = c.plan, c.job
        assert plan is not None and plan.operation.job is not None and job is not None
        if job.trued_up_us is not None:
            return  # read before: its charge is its real cost already
        usages = await self._usages(c, resp)
        if usages is None:
            return  # queued, running, or ended without a usage: it stays charged as it is
        cost = job_cost(plan.operation.job, usages, job.model, job.provider, self.rt.pricing)
        if cost is None:
            return  # a price gone since the job was created: it stays as charged
        usd, total = cost
        t = await self.rt.store_call(
            self.rt.ledger.true_up_job,
            job.provider,
            job.job_id,
            usd,
            total.input_tokens,
            total.output_tokens,
        )
        if t is None:
            return  # another read (here or in another process) trued it up first
        if not self.rt.audit.record(LLM_REQUEST, **true_up_entry(c, flow, t, total)):
            log.error("audit entry of the true-up of job %s not accepted", job.job_id)
        m = self.rt.metrics
        provider = m.provider_label(job.provider)
        m.charged.labels(provider, "reported").inc()
        m.cost.labels(
            provider, m.model_label(job.model), m.tenant_label(job.tenant)
        ).inc(max(0.0, t.adjustment_usd))


def point_results_here(flow: http.HTTPFlow, c: RequestContext, resp: http.Response) -> None:
    """A Message Batch names its results by an absolute URL at the provider (`results_url`), which
    the SDKs fetch as is: through the reverse proxy it is rewritten to the same path on this
    route, so the results are read through Candela (and trued up), not around it."""
    try:
        obj = json.loads(resp.content or b"")
    except ValueError:
        return
    url = obj.get("results_url") if isinstance(obj, dict) else None
    if not isinstance(url, str) or not url:
        return
    path = urlsplit(url).path
    plan = c.plan
    assert plan is not None
    if path != f"/v1/messages/batches/{plan.job_id}/results":
        return  # not the shape we know: left alone (the results stay unread through Candela)
    scheme = "https" if flow.client_conn.tls_established else "http"
    if not c.client_host:
        return
    obj["results_url"] = f"{scheme}://{c.client_host}/proxy/{c.provider}{path}"
    resp.content = json.dumps(obj).encode()

"""`/api/orders` (a buyer orders a published agent) and the marketplace's order-approved webhook,
which creates the buyer's agent config and queues its provisioning in one transaction."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import BaseModel, Field

from cmp.api.fields import Body, Query
from cmp.api.operation import Call, Operation, Reply
from cmp.api.pages import FIRST_ID, Page
from cmp.errors import Conflict, InvalidInput, NotFound
from cmp.ids import uuid7
from cmp.provisioning import queue_provisioning

OrderStatus = Literal["pending", "approved", "rejected"]


class Order(BaseModel):
    order_id: uuid.UUID
    customer_org_id: uuid.UUID
    provider_agent_id: uuid.UUID
    agent_name: str
    flow_version: int
    status: OrderStatus
    agent_id: uuid.UUID | None = Field(
        description="the buyer's agent instance, once the order is approved"
    )
    created_at: dt.datetime
    approved_at: dt.datetime | None


class NewOrder(Body):
    org_id: uuid.UUID = Field(description="the buying (customer) organisation")
    provider_agent_id: uuid.UUID


class OrderFilter(Query):
    org_id: uuid.UUID | None = None
    status: OrderStatus | None = None


class OrderApproved(Body):
    id: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$",
                    description="the delivery id; a delivery seen before is not applied again")
    type: Literal["order.approved"]
    order_id: uuid.UUID


class WebhookResult(BaseModel):
    order_id: uuid.UUID
    agent_id: uuid.UUID
    duplicate: bool


_ORDER_COLUMNS = (
    "o.order_id, o.customer_org_id, o.provider_agent_id, p.name AS agent_name, o.flow_version,"
    " o.status, c.agent_id, o.created_at, o.approved_at"
)
_ORDER_FROM = (
    " FROM orders o JOIN provider_agents p USING (provider_agent_id)"
    " LEFT JOIN customer_agent_configs c ON c.order_id = o.order_id"
)


async def create_order(call: Call) -> Reply:
    body: NewOrder = call.body
    call.caller.require(body.org_id, "admin", "organisation")
    async with call.conn.transaction():
        kind = await call.conn.fetchval(
            "SELECT kind FROM organisations WHERE org_id = $1", body.org_id
        )
        if kind == "provider":
            raise InvalidInput("a provider organisation cannot buy agents",
                               fields={"org_id": "not a customer organisation"})
        agent = await call.conn.fetchrow(
            "SELECT current_version FROM provider_agents"
            " WHERE provider_agent_id = $1 AND published", body.provider_agent_id,
        )
        if agent is None:
            raise NotFound(f"no published agent {body.provider_agent_id} in the marketplace")
        order_id = uuid7()
        await call.conn.execute(
            "INSERT INTO orders (order_id, customer_org_id, provider_agent_id, flow_version,"
            " status, created_by) VALUES ($1, $2, $3, $4, 'pending', $5)",
            order_id, body.org_id, body.provider_agent_id, agent["current_version"],
            call.caller.user_id,
        )
        await call.audit("order.create", "order", order_id, body.org_id,
                         {"provider_agent_id": str(body.provider_agent_id)})
    return Reply(await _order(call, order_id, [body.org_id]), 201)


async def _order(call: Call, order_id: uuid.UUID, orgs: list[uuid.UUID]) -> Order:
    row = await call.conn.fetchrow(
        f"SELECT {_ORDER_COLUMNS}{_ORDER_FROM} WHERE o.order_id = $1"
        " AND o.customer_org_id = ANY($2)", order_id, orgs,
    )
    if row is None:
        raise NotFound(f"no order {order_id}")
    return Order(**dict(row))


async def get_order(call: Call) -> Order:
    return await _order(call, call.path_id("order_id", "order"), call.caller.org_ids())


async def list_orders(call: Call) -> Page[Order]:
    page, wanted = call.page, call.query
    assert page is not None and isinstance(wanted, OrderFilter)
    rows = await call.conn.fetch(
        "SELECT o.* FROM unnest($1::uuid[]) AS t(org_id) CROSS JOIN LATERAL ("
        f" SELECT {_ORDER_COLUMNS}{_ORDER_FROM} WHERE o.customer_org_id = t.org_id"
        "  AND o.order_id > $2 AND ($3::text IS NULL OR o.status = $3)"
        "  ORDER BY o.order_id LIMIT $4) o ORDER BY o.order_id LIMIT $4",
        call.caller.org_ids(only=wanted.org_id),
        page.after[0] if page.after else FIRST_ID, wanted.status, page.limit + 1,
    )
    return page.page([Order(**dict(r)) for r in rows], lambda o: [o.order_id])


async def order_approved(call: Call) -> WebhookResult:
    """Idempotent by order id and by delivery id: a replay answers what the first did."""
    body: OrderApproved = call.body
    async with call.conn.transaction():
        order = await call.conn.fetchrow(
            "SELECT o.order_id, o.customer_org_id, o.provider_agent_id, o.flow_version,"
            " o.status, p.name, p.limits FROM orders o JOIN provider_agents p"
            " USING (provider_agent_id) WHERE o.order_id = $1 FOR UPDATE OF o",
            body.order_id,
        )
        if order is None:
            raise NotFound(f"no order {body.order_id}")
        fresh = await call.conn.fetchval(
            "INSERT INTO webhook_deliveries (delivery_id, order_id) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING true", body.id, body.order_id,
        )
        existing = await call.conn.fetchval(
            "SELECT agent_id FROM customer_agent_configs WHERE order_id = $1", body.order_id
        )
        if existing is not None:
            return WebhookResult(order_id=body.order_id, agent_id=existing, duplicate=True)
        if order["status"] == "rejected":
            raise Conflict(f"order {body.order_id} was rejected")
        if not fresh:
            raise Conflict(f"delivery {body.id!r} was seen for another order")
        agent_id = uuid7()
        await call.conn.execute(
            "UPDATE orders SET status = 'approved', approved_at = now() WHERE order_id = $1",
            body.order_id,
        )
        await call.conn.execute(
            "INSERT INTO customer_agent_configs (agent_id, tenant_id, order_id,"
            " provider_agent_id, flow_version, display_name, limits)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            agent_id, order["customer_org_id"], body.order_id, order["provider_agent_id"],
            order["flow_version"], order["name"], order["limits"],
        )
        await queue_provisioning(call.conn, agent_id)
        await call.audit("order.approve", "order", body.order_id, order["customer_org_id"],
                         {"agent_id": str(agent_id), "delivery_id": body.id})
    call.services.provisioner.wake()
    return WebhookResult(order_id=body.order_id, agent_id=agent_id, duplicate=False)


OPERATIONS = [
    Operation("POST", "/api/orders", "Order a published agent for a customer organisation",
              create_order, "orders", body=NewOrder, response=Order, status=201,
              errors=(403, 404)),
    Operation("GET", "/api/orders", "Your organisations' orders", list_orders, "orders",
              query=OrderFilter, response=Order, paged=True),
    Operation("GET", "/api/orders/{order_id}", "One order", get_order, "orders",
              response=Order),
    Operation("POST", "/api/webhooks/order-approved",
              "The marketplace's order-approved webhook (SiteKit-Signature: t=..,v1=HMAC)",
              order_approved, "orders", body=OrderApproved, response=WebhookResult,
              auth="webhook", errors=(404, 409)),
]

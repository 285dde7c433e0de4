"""The original README's walk-through: credit, balance, order, order details, debit."""

from __future__ import annotations

from decimal import Decimal

from tests.builders import Provider, start_service


async def test_original_walkthrough(database_url: str, provider: Provider) -> None:
    async with start_service(database_url, provider.url) as api:
        credited = await api.credit("CLIENT123", 1000.50)
        assert credited.status_code == 200
        assert credited.json() == {
            "success": True,
            "message": "Wallet credited successfully",
            "data": {
                "clientId": "CLIENT123",
                "previousBalance": 0,
                "newBalance": 1000.5,
                "amountCredited": 1000.5,
            },
        }
        order = await api.order("CLIENT123", 99.99)
        assert order.status_code == 201, order.text
        created = order.json()
        assert created["message"] == "Order created successfully"
        assert created["data"]["status"] == "COMPLETED"
        assert created["data"]["amount"] == 99.99
        details = await api.get_order("CLIENT123", created["data"]["orderId"])
        assert details.status_code == 200
        assert details.json()["data"]["fulfillmentId"] == created["data"]["fulfillmentId"]
        debited = await api.debit("CLIENT123", 250.00)
        assert debited.json()["data"] == {
            "clientId": "CLIENT123",
            "previousBalance": 900.51,
            "newBalance": 650.51,
            "amountDebited": 250,
        }
        assert await api.balance("CLIENT123") == Decimal("650.51")

"""A travel booking saga: book a flight and a hotel, charge the card; if anything fails, undo what was done.

Each booking step names its compensation (``compensate=``). When the card is
declined, the instance fails for good and Stepline runs the compensations of
the committed steps, newest first, each a durable step with its own retries:
the hotel is cancelled, then the flight. The instance ends ``errored`` with the
card's error; ``stepline history ID`` shows every compensation.

Run it with ``stepline-worker --workflows examples.booking_saga``, or try it
without any server: ``python -m examples.booking_saga`` runs two trips in the
testing kit (the real engine on SQLite, on virtual time) and prints their histories.
"""

from __future__ import annotations

import asyncio
import hashlib

from pydantic import BaseModel, Field

from stepline import Context, NonRetryableError, RetryPolicy, step_info, workflow
from stepline.worker.testing import WorkflowEnvironment


class Trip(BaseModel):
    """What the travel site sends when a customer books."""

    trip_id: str
    traveller: str
    flight: str
    hotel: str
    nights: int = Field(gt=0, le=30)
    card: str


class Booking(BaseModel):
    reference: str
    price_cents: int


class Itinerary(BaseModel):
    trip_id: str
    flight: str
    hotel: str
    payment: str


def _reference(prefix: str) -> str:
    # The idempotency key is stable across retries: a real supplier books once per key.
    return prefix + hashlib.sha256(step_info().idempotency_key.encode()).hexdigest()[:8].upper()


async def book_flight(trip: Trip) -> Booking:
    await asyncio.sleep(0.01)
    return Booking(reference=_reference("FL-"), price_cents=24_900)


async def cancel_flight(trip: Trip, booking: Booking) -> str:
    """The compensation of ``book_flight``: its arguments, then its result."""
    await asyncio.sleep(0.01)
    return f"cancelled {booking.reference}"


async def book_hotel(trip: Trip) -> Booking:
    await asyncio.sleep(0.01)
    return Booking(reference=_reference("HO-"), price_cents=11_000 * trip.nights)


async def cancel_hotel(trip: Trip, booking: Booking) -> str:
    await asyncio.sleep(0.01)
    return f"cancelled {booking.reference}"


async def charge_card(trip: Trip, amount_cents: int) -> str:
    if trip.card.startswith("0000"):
        raise NonRetryableError(f"card declined for {trip.traveller}")  # no retry, and the saga rolls back
    return _reference("PAY-")


@workflow("booking-saga")
async def booking_saga(ctx: Context, trip: Trip) -> Itinerary:
    """Book a flight and a hotel and charge the card, or undo the bookings."""
    flight = await ctx.step(
        "book-flight",
        book_flight,
        trip,
        compensate=cancel_flight,
        compensate_retry=RetryPolicy(limit=10, delay="1s", backoff="exponential"),
    )
    hotel = await ctx.step("book-hotel", book_hotel, trip, compensate=cancel_hotel)
    payment = await ctx.step("charge-card", charge_card, trip, flight.price_cents + hotel.price_cents)
    return Itinerary(trip_id=trip.trip_id, flight=flight.reference, hotel=hotel.reference, payment=payment)


TRIPS = [
    Trip(trip_id="T-1", traveller="Ada", flight="LHR-JFK", hotel="The Jane", nights=3, card="4242 4242"),
    Trip(trip_id="T-2", traveller="Bob", flight="CDG-NRT", hotel="Hoshinoya", nights=2, card="0000 0000"),
]


async def main() -> None:
    """Run both trips in the testing kit and print how each ended, with its history."""
    environment = WorkflowEnvironment()
    try:
        for trip in TRIPS:
            run = await environment.start(booking_saga, trip, instance_id=trip.trip_id)
            ending = run.output if run.status == "complete" else (run.error or {}).get("message")
            print(f"{trip.trip_id} ({trip.traveller}): {run.status}: {ending}")
            for entry in run.history:
                print(f"    {entry.name:<18} {entry.kind:<9} {entry.status}")
    finally:
        environment.close()


if __name__ == "__main__":
    asyncio.run(main())

package posthorn_test

// A small service: ship an order and write its OrderShipped event in the same transaction,
// with pgx. The test TestTheOrderShippedExampleIsPublished runs it.

import (
	"context"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	posthorn "github.com/posthorn/posthorn/writers/go"
)

// OrderShipped is the event's JSON payload.
type OrderShipped struct {
	OrderID string `json:"order_id"`
	Carrier string `json:"carrier"`
}

// ShipOrder marks the order shipped and writes its event, both in the caller's transaction tx.
// The trace context of the span in ctx goes into the event's headers.
func ShipOrder(ctx context.Context, tx pgx.Tx, orderID, carrier string) (uuid.UUID, error) {
	// The UPDATE locks the order's row, so events of one order are written, and published, in
	// the order their transactions commit.
	tag, err := tx.Exec(ctx, `UPDATE orders SET status = 'shipped', carrier = $2, version = version + 1
		WHERE id = $1 AND status = 'placed'`, orderID, carrier)
	if err != nil {
		return uuid.UUID{}, err
	}
	if tag.RowsAffected() == 0 {
		return uuid.UUID{}, fmt.Errorf("order %s is not waiting to be shipped", orderID)
	}
	event, err := posthorn.NewEvent("order", orderID, "OrderShipped").
		JSON(OrderShipped{OrderID: orderID, Carrier: carrier}).
		Build()
	if err != nil {
		return uuid.UUID{}, err
	}
	return posthorn.Enqueue(ctx, tx, event)
}

// HandleShipRequest is what a request handler does: one transaction for the order's change and
// its event. Both or neither: the order is shipped and its event exists, or nothing happened.
func HandleShipRequest(ctx context.Context, pool *pgxpool.Pool, orderID, carrier string) (uuid.UUID, error) {
	var eventID uuid.UUID
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var err error
		eventID, err = ShipOrder(ctx, tx, orderID, carrier)
		return err
	})
	return eventID, err
}

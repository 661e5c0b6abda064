BEGIN;
-- Bytes, published exactly as stored, with the header content-type: image/png.
SELECT outbox_enqueue_bytes('order', 'order-42', 'LabelPrinted',
                            '\x89504e470d0a1a0a'::bytea, 'image/png');
-- A tombstone: a record with no value (it deletes the key in a compacted topic).
SELECT outbox_enqueue_tombstone('order', 'order-42', 'OrderForgotten');
COMMIT;

"""Protobuf payloads: encode a message with the protobuf package and write it as bytes with its
content type. The relay publishes the bytes exactly as stored, with content-type:
application/x-protobuf; a consumer decodes the value with the same message type."""

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from posthorn_writer import Bytes, Event

CONTENT_TYPE = "application/x-protobuf"


def _order_shipped_class() -> Any:
    """The message type

        message OrderShipped { string order_id = 1; string carrier = 2; uint32 parcels = 3; }

    described by hand here, so that no protoc is needed. With protoc's generated module, use
    ``order_pb2.OrderShipped`` instead: the bytes are the same."""
    file = descriptor_pb2.FileDescriptorProto(name="shop/order.proto", package="shop")
    file.syntax = "proto3"
    message = file.message_type.add(name="OrderShipped")
    for number, (name, kind) in enumerate(
        [("order_id", "TYPE_STRING"), ("carrier", "TYPE_STRING"), ("parcels", "TYPE_UINT32")],
        start=1,
    ):
        message.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.Type.Value(kind),
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.OrderShipped"))


OrderShipped = _order_shipped_class()


def order_shipped_event(order_id: str, carrier: str, parcels: int) -> Event:
    """The event for an order shipped in ``parcels`` parcels, its payload protobuf-encoded."""
    shipped = OrderShipped(order_id=order_id, carrier=carrier, parcels=parcels)
    return Event(
        "order", order_id, "OrderShipped", Bytes(shipped.SerializeToString(), CONTENT_TYPE)
    )

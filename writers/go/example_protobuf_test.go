package posthorn_test

// Protobuf payloads: encode a message with google.golang.org/protobuf and write it as bytes
// with its content type. The relay publishes the bytes exactly as stored, with content-type:
// application/x-protobuf; a consumer decodes the value with the same message type.

import (
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	"google.golang.org/protobuf/types/dynamicpb"

	posthorn "github.com/posthorn/posthorn/writers/go"
)

// ProtobufContentType is the content type of protobuf payloads.
const ProtobufContentType = "application/x-protobuf"

// orderShippedType is the message type
//
//	message OrderShipped { string order_id = 1; string carrier = 2; uint32 parcels = 3; }
//
// described by hand here, so that no protoc is needed. With protoc-gen-go's generated type,
// pass &orderpb.OrderShipped{...} to proto.Marshal instead: the bytes are the same.
var orderShippedType = func() protoreflect.MessageDescriptor {
	field := func(name string, number int32, kind descriptorpb.FieldDescriptorProto_Type) *descriptorpb.FieldDescriptorProto {
		return &descriptorpb.FieldDescriptorProto{
			Name: proto.String(name), Number: proto.Int32(number), Type: kind.Enum(),
			Label: descriptorpb.FieldDescriptorProto_LABEL_OPTIONAL.Enum(),
		}
	}
	file, err := protodesc.NewFile(&descriptorpb.FileDescriptorProto{
		Name: proto.String("shop/order.proto"), Package: proto.String("shop"), Syntax: proto.String("proto3"),
		MessageType: []*descriptorpb.DescriptorProto{{
			Name: proto.String("OrderShipped"),
			Field: []*descriptorpb.FieldDescriptorProto{
				field("order_id", 1, descriptorpb.FieldDescriptorProto_TYPE_STRING),
				field("carrier", 2, descriptorpb.FieldDescriptorProto_TYPE_STRING),
				field("parcels", 3, descriptorpb.FieldDescriptorProto_TYPE_UINT32),
			},
		}},
	}, nil)
	if err != nil {
		panic(err)
	}
	return file.Messages().ByName("OrderShipped")
}()

// OrderShippedEvent is the event for an order shipped in parcels, its payload
// protobuf-encoded.
func OrderShippedEvent(orderID, carrier string, parcels uint32) (posthorn.Event, error) {
	msg := dynamicpb.NewMessage(orderShippedType)
	fields := orderShippedType.Fields()
	msg.Set(fields.ByName("order_id"), protoreflect.ValueOfString(orderID))
	msg.Set(fields.ByName("carrier"), protoreflect.ValueOfString(carrier))
	msg.Set(fields.ByName("parcels"), protoreflect.ValueOfUint32(parcels))
	// Deterministic: fields in number order, as generated code writes them (a dynamic message
	// otherwise writes them in any order).
	payload, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
	if err != nil {
		return posthorn.Event{}, err
	}
	return posthorn.NewEvent("order", orderID, "OrderShipped").
		Bytes(payload, ProtobufContentType).
		Build()
}

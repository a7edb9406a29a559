module dynamo-grpc/clients/go

go 1.19

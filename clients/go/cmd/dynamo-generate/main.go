// Command dynamo-generate streams one generation from a dynamo-grpc router (RouterService.Generate).
//
// The answer goes to stdout as it streams, then a newline; the completion's finish reason and usage go
// to stderr. --cancel-after N sends the in-band cancel once N tokens have arrived.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
	"unicode"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	pb "dynamo-grpc/clients/go/gen/dynamo_grpc/v1"
)

// deadlineGrace is how long past the request's deadline the call itself may last.
const deadlineGrace = time.Second

type options struct {
	router      string
	model       string
	prompt      string
	requestID   string
	maxTokens   uint
	temperature float64
	ignoreEOS   bool
	cancelAfter int
	timeout     time.Duration
	tokenIDs    bool
}

func parseOptions() options {
	var o options
	var timeoutS float64
	flag.StringVar(&o.router, "router", "127.0.0.1:50051", "router endpoint host:port")
	flag.StringVar(&o.model, "model", "tiny-llama", "model name")
	flag.StringVar(&o.requestID, "request-id", "", "request id (the router assigns one when empty)")
	flag.UintVar(&o.maxTokens, "max-tokens", 32, "tokens to generate")
	flag.Float64Var(&o.temperature, "temperature", 0, "sampling temperature (0 = greedy)")
	flag.BoolVar(&o.ignoreEOS, "ignore-eos", false, "keep generating past the end-of-sequence token")
	flag.IntVar(&o.cancelAfter, "cancel-after", 0,
		"send a cancel once this many tokens have arrived (0 = never)")
	flag.Float64Var(&timeoutS, "timeout-s", 0, "the request's deadline in seconds (0 = none)")
	flag.BoolVar(&o.tokenIDs, "token-ids", false, "also print the generated token ids on stderr")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: dynamo-generate [flags] PROMPT\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	o.prompt = flag.Arg(0)
	o.timeout = time.Duration(timeoutS * float64(time.Second))
	return o
}

func startRequest(o options, deadline time.Time) *pb.GenerateRequest {
	maxTokens := uint32(o.maxTokens)
	temperature := float32(o.temperature)
	params := &pb.GenerationParams{
		Model:  o.model,
		Prompt: &pb.Prompt{Form: &pb.Prompt_Text{Text: o.prompt}},
		Sampling: &pb.SamplingParams{
			MaxTokens: &maxTokens, Temperature: &temperature, IgnoreEos: o.ignoreEOS,
		},
	}
	if !deadline.IsZero() {
		params.Deadline = timestamppb.New(deadline)
	}
	return &pb.GenerateRequest{RequestId: o.requestID, Action: &pb.GenerateRequest_Start{Start: params}}
}

func cancelRequest(requestID string) *pb.GenerateRequest {
	return &pb.GenerateRequest{
		RequestId: requestID,
		Action:    &pb.GenerateRequest_Cancel{Cancel: &pb.CancelAction{Reason: "client cancel"}},
	}
}

// generate runs one request and returns its completion, printing text (and token ids) as they arrive.
// With a timeout the request carries its deadline, so the router ends it with DEADLINE_EXCEEDED and its
// reason; the call's own deadline, a grace period later, bounds the wait for a router that never answers.
func generate(client pb.RouterServiceClient, o options) (*pb.Completion, error) {
	ctx := context.Background()
	var deadline time.Time
	if o.timeout > 0 {
		deadline = time.Now().Add(o.timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, deadline.Add(deadlineGrace))
		defer cancel()
	}
	stream, err := client.Generate(ctx)
	if err != nil {
		return nil, err
	}
	// The send side stays open: a later message on it is the cancel.
	if err := stream.Send(startRequest(o, deadline)); err != nil {
		return nil, recvError(stream)
	}
	var ids []string
	received, cancelled, printed := 0, false, false
	for {
		response, err := stream.Recv()
		if err != nil {
			if printed {
				fmt.Println()
			}
			return nil, err
		}
		if completion := response.GetCompletion(); completion != nil {
			fmt.Println()
			if o.tokenIDs {
				fmt.Fprintf(os.Stderr, "token ids: %s\n", strings.Join(ids, " "))
			}
			return completion, nil
		}
		batch := response.GetTokens()
		fmt.Print(batch.GetText())
		printed = true
		for _, id := range batch.GetTokenIds() {
			ids = append(ids, fmt.Sprint(id))
		}
		received += len(batch.GetTokenIds())
		if o.cancelAfter > 0 && received >= o.cancelAfter && !cancelled {
			cancelled = true
			if err := stream.Send(cancelRequest(response.GetRequestId())); err != nil {
				return nil, recvError(stream)
			}
			_ = stream.CloseSend()
		}
	}
}

// recvError is the call's status after a failed Send: gRPC reports it on Recv, not on Send.
func recvError(stream pb.RouterService_GenerateClient) error {
	for {
		if _, err := stream.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return errors.New("the router closed the stream without a completion")
			}
			return err
		}
	}
}

// describe names a failed call as `CODE REASON: message`, REASON being the ErrorInfo the server sent
// (left out when it only repeats the code).
func describe(err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	name := codeName(st.Code())
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok && info.GetReason() != name {
			name += " " + info.GetReason()
		}
	}
	return fmt.Sprintf("%s: %s", name, st.Message())
}

// codeName spells a status code as the gRPC spec does (NOT_FOUND), not as Go does (NotFound).
func codeName(code codes.Code) string {
	if code == codes.Canceled {
		return "CANCELLED"
	}
	var name strings.Builder
	for i, r := range code.String() {
		if i > 0 && unicode.IsUpper(r) {
			name.WriteByte('_')
		}
		name.WriteRune(unicode.ToUpper(r))
	}
	return name.String()
}

func main() {
	o := parseOptions()
	conn, err := grpc.Dial(o.router, grpc.WithInsecure())
	if err != nil {
		fmt.Fprintf(os.Stderr, "dynamo-generate: %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	completion, err := generate(pb.NewRouterServiceClient(conn), o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "dynamo-generate: %s\n", describe(err))
		os.Exit(1)
	}
	usage := completion.GetUsage()
	fmt.Fprintf(os.Stderr, "[%d prompt + %d completion tokens, finish: %s]\n",
		usage.GetPromptTokens(), usage.GetCompletionTokens(), completion.GetFinishReason())
}

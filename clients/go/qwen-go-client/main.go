// qwen-go-client streams one greedy generation from qwen-serve with Go stubs generated from proto/
// (`make -C clients go`).
//
//	qwen-go-client HOST:PORT PROMPT [MAX_TOKENS]
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	qwenservev1 "github.com/qwen-serve/qwen-serve/gen/go/qwen_serve/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: qwen-go-client HOST:PORT PROMPT [MAX_TOKENS]")
		os.Exit(2)
	}
	maxTokens := uint64(64)
	if len(os.Args) > 3 {
		parsed, err := strconv.ParseUint(os.Args[3], 10, 32)
		if err != nil {
			fmt.Fprintln(os.Stderr, "MAX_TOKENS must be a positive integer")
			os.Exit(2)
		}
		maxTokens = parsed
	}
	conn, err := grpc.Dial(os.Args[1], grpc.WithInsecure())
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	defer conn.Close()
	os.Exit(stream(qwenservev1.NewQwenServeClient(conn), os.Args[2], uint32(maxTokens)))
}

func stream(client qwenservev1.QwenServeClient, prompt string, maxTokens uint32) int {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	request := &qwenservev1.GenerateRequest{
		Input: &qwenservev1.GenerateRequest_Prompt{Prompt: prompt},
		// proto3 optional: an explicit 0 is greedy.
		Sampling: &qwenservev1.SamplingParams{Temperature: proto.Float32(0)},
		Stopping: &qwenservev1.StoppingParams{MaxTokens: proto.Uint32(maxTokens)},
	}
	events, err := client.Generate(ctx, request)
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		return 1
	}
	for {
		response, err := events.Recv()
		if err == io.EOF {
			return 0
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "\nerror:", err)
			return 1
		}
		if token := response.GetToken(); token != nil {
			fmt.Print(token.GetText())
		} else if finished := response.GetFinished(); finished != nil {
			fmt.Println()
			fmt.Fprintf(os.Stderr, "[%s: %d generated tokens]\n", finished.GetReason(),
				finished.GetUsage().GetCompletionTokens())
		}
	}
}

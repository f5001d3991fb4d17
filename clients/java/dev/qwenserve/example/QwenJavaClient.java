// Streams one generation from qwen-serve with Java stubs generated from proto/ (`make -C clients java`).
//   java -cp ... dev.qwenserve.example.QwenJavaClient HOST:PORT PROMPT [MAX_TOKENS]
package dev.qwenserve.example;

import dev.qwenserve.v1.GenerateRequest;
import dev.qwenserve.v1.GenerateResponse;
import dev.qwenserve.v1.QwenServeGrpc;
import dev.qwenserve.v1.SamplingParams;
import dev.qwenserve.v1.StoppingParams;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import java.util.Iterator;

public final class QwenJavaClient {
  private QwenJavaClient() {}

  static GenerateRequest buildRequest(String prompt, int maxTokens) {
    return GenerateRequest.newBuilder()
        .setPrompt(prompt)
        // proto3 optional: an explicit 0 is greedy, unset would be the server default (1.0).
        .setSampling(SamplingParams.newBuilder().setTemperature(0.0f))
        .setStopping(StoppingParams.newBuilder().setMaxTokens(maxTokens))
        .build();
  }

  public static void main(String[] args) {
    if (args.length < 2) {
      System.err.println("usage: QwenJavaClient HOST:PORT PROMPT [MAX_TOKENS]");
      System.exit(2);
    }
    int maxTokens = args.length > 2 ? Integer.parseInt(args[2]) : 64;
    ManagedChannel channel = ManagedChannelBuilder.forTarget(args[0]).usePlaintext().build();
    try {
      Iterator<GenerateResponse> stream =
          QwenServeGrpc.newBlockingStub(channel).generate(buildRequest(args[1], maxTokens));
      while (stream.hasNext()) {
        GenerateResponse response = stream.next();
        if (response.hasToken()) {
          System.out.print(response.getToken().getText());
          System.out.flush();
        } else if (response.hasFinished()) {
          System.out.println();
          System.err.println("[" + response.getFinished().getReason() + ": "
              + response.getFinished().getUsage().getCompletionTokens() + " generated tokens]");
        }
      }
    } finally {
      channel.shutdownNow();
    }
  }
}

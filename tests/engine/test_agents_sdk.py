"""A real agent framework on our Responses API: the OpenAI Agents SDK, one turn with a tool."""

from __future__ import annotations

import asyncio

import openai
from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

from tests.engine.conftest import SERVED_NAME
from tests.support.servers import Server

calls: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    calls.append(city)
    return f"Sunny and 21C in {city}"


def test_an_agent_calls_its_tool_through_our_responses_api(server: Server) -> None:
    set_tracing_disabled(True)  # tracing would upload to OpenAI
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.keys["tester"], max_retries=0)
    agent = Agent(
        name="weather",
        instructions="Answer weather questions with the get_weather tool.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=SERVED_NAME, openai_client=client),
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=100),
        tool_use_behavior="stop_on_first_tool",  # the tool's answer is the agent's answer
    )
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=2))
    assert len(calls) == 1 and calls[0]
    assert result.final_output == f"Sunny and 21C in {calls[0]}"
